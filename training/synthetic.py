"""A synthetic e-commerce behaviour log with learnable sequential structure, deterministic under its seed.

Why it exists: tests and the default config need data without ../shared, and that data must let a sequence
model beat most-popular clearly, or a broken model would pass unnoticed. How a log is drawn:
  - items sku-00001.. sit in latent clusters of CLUSTER_SIZE consecutive ids (the category in the attributes);
    item popularity is Zipf over a random ranking, so traffic has a long tail;
  - each user walks a Markov chain over clusters: stays with STAY_PROBABILITY, otherwise jumps to one of its
    favourite clusters or to a companion cluster of the current one ("phone" → "phone case");
  - with FOLLOW_PROBABILITY the next item is the previous item's fixed successor (unless already viewed),
    otherwise a popularity-weighted draw inside the cluster that avoids items the user has already viewed
    (independent draws would repeat far more often than real logs do);
  - each page view may be followed by fav, cart and buy events on the same item; most buys follow a cart;
    shares come out near Taobao UserBehavior's pv 90 %, cart 5 %, fav 3 %, buy 2 %;
  - timestamps are integer seconds: about a minute between views, hours between sessions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.training.data import Interactions

CLUSTER_SIZE = 25
ZIPF_EXPONENT = 1.0  # item weight ∝ popularity rank ** -ZIPF_EXPONENT
STAY_PROBABILITY = 0.75  # next view stays in the current cluster
FAVOURITE_JUMP_PROBABILITY = 0.6  # a jump goes to a favourite cluster, else to a companion cluster
NUM_FAVOURITE_CLUSTERS = 3
NUM_COMPANION_CLUSTERS = 2
FOLLOW_PROBABILITY = 0.5  # next view is the previous item's successor
SUCCESSOR_SAME_CLUSTER = 0.8  # share of successors inside the item's own cluster
REPEAT_RETRIES = 3  # redraws for a view of an already viewed item; after that the repeat stays
MIN_VIEWS, MEDIAN_EXTRA_VIEWS, VIEWS_SIGMA, MAX_VIEWS = 3, 11, 0.6, 200  # views per user: 3 + lognormal
FAV_AFTER_VIEW, CART_AFTER_VIEW = 0.034, 0.057
BUY_AFTER_CART, BUY_WITHOUT_CART = 0.30, 0.005
BEHAVIOR_NAMES = ("pv", "fav", "cart", "buy")  # order of the events that one view expands into
BRANDS_PER_CLUSTER = 3
START_TIME = 1511539200  # 2017-11-25 00:00 UTC+8, the start of the Taobao UserBehavior window
WINDOW_SECONDS = 9 * 86400
SESSION_BREAK_PROBABILITY = 0.1
SYNTHETIC_ITEM = re.compile(r"sku-(\d+)")


def _item_id(number: np.ndarray) -> np.ndarray:
    return np.array([f"sku-{n:05d}" for n in number], dtype=object)


class _Catalog:
    """Item clusters, popularity, companion clusters and successors; item numbers are 0-based here."""

    def __init__(self, num_items: int, rng: np.random.Generator, zipf_exponent: float = ZIPF_EXPONENT):
        self.cluster_of = np.arange(num_items) // CLUSTER_SIZE
        num_clusters = int(self.cluster_of[-1]) + 1
        self.cluster_start = np.arange(num_clusters) * CLUSTER_SIZE
        self.cluster_end = np.minimum(self.cluster_start + CLUSTER_SIZE, num_items)
        popularity = (rng.permutation(num_items) + 1.0) ** -zipf_exponent
        cluster_total = np.bincount(self.cluster_of, weights=popularity)
        self.cluster_weight = cluster_total / cluster_total.sum()
        # sampling keys: cluster c's items own (c, c+1] split by popularity, so one searchsorted samples every row
        within = np.cumsum(popularity) - np.concatenate([[0.0], np.cumsum(cluster_total)])[self.cluster_of]
        self.keys = self.cluster_of + within / cluster_total[self.cluster_of]
        self.keys[self.cluster_end - 1] = np.arange(num_clusters) + 1.0
        offsets = rng.integers(1, max(num_clusters, 2), (num_clusters, NUM_COMPANION_CLUSTERS))
        self.companions = (np.arange(num_clusters)[:, None] + offsets) % num_clusters  # never itself, if C > 1
        self.successor = np.empty(num_items, dtype=np.int64)
        for c in range(num_clusters):  # a cycle through each cluster, so following successors rarely repeats
            members = rng.permutation(np.arange(self.cluster_start[c], self.cluster_end[c]))
            self.successor[members] = np.roll(members, -1)
        jumps = np.flatnonzero(rng.random(num_items) >= SUCCESSOR_SAME_CLUSTER)
        target_clusters = self.companions[self.cluster_of[jumps], rng.integers(NUM_COMPANION_CLUSTERS, size=len(jumps))]
        self.successor[jumps] = self.sample(target_clusters, rng)

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item per entry of `clusters`."""
        drawn = np.searchsorted(self.keys, clusters + rng.random(len(clusters)), side="right")
        return np.clip(drawn, self.cluster_start[clusters], self.cluster_end[clusters] - 1)


def _views(catalog: _Catalog, num_users: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(views per user (U,), viewed item numbers (U, max views)); all users advance one step at a time."""
    extra = np.round(rng.lognormal(np.log(MEDIAN_EXTRA_VIEWS), VIEWS_SIGMA, num_users))
    lengths = MIN_VIEWS + np.minimum(extra, MAX_VIEWS - MIN_VIEWS).astype(np.int64)
    favourites = rng.choice(len(catalog.cluster_weight), (num_users, NUM_FAVOURITE_CLUSTERS), p=catalog.cluster_weight)
    views = np.zeros((num_users, lengths.max()), dtype=np.int64)
    cluster = favourites[:, 0].copy()
    for step in range(lengths.max()):
        users = np.flatnonzero(lengths > step)
        current = cluster[users]
        if step:
            stay = rng.random(len(users)) < STAY_PROBABILITY
            to_favourite = rng.random(len(users)) < FAVOURITE_JUMP_PROBABILITY
            favourite = favourites[users, rng.integers(NUM_FAVOURITE_CLUSTERS, size=len(users))]
            companion = catalog.companions[current, rng.integers(NUM_COMPANION_CLUSTERS, size=len(users))]
            current = np.where(stay, current, np.where(to_favourite, favourite, companion))
        item = catalog.sample(current, rng)
        for _ in range(REPEAT_RETRIES):
            repeat = (views[users, :step] == item[:, None]).any(axis=1)
            if not repeat.any():
                break
            item[repeat] = catalog.sample(current[repeat], rng)
        if step:
            successor = catalog.successor[views[users, step - 1]]
            unseen = ~(views[users, :step] == successor[:, None]).any(axis=1)
            item = np.where((rng.random(len(users)) < FOLLOW_PROBABILITY) & unseen, successor, item)
        views[users, step] = item
        cluster[users] = catalog.cluster_of[item]
    return lengths, views


def generate_log(num_users: int = 2000, num_items: int = 500, seed: int = 0,
                 zipf_exponent: float = ZIPF_EXPONENT) -> Interactions:
    """A behaviour log of `num_users` users ("u0".."u{U-1}") over items "sku-00001".., grouped by user in time order.

    zipf_exponent: a flatter popularity (e.g. 0.5) lets a log of a few events per item touch nearly every item of
    a huge catalogue, which at 1.0 needs about 15 events per item.
    """
    if num_users < 1 or num_items < 2:
        raise ValueError(f"need num_users >= 1 and num_items >= 2, got {num_users} and {num_items}")
    if zipf_exponent < 0:
        raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent}")
    rng = np.random.default_rng(seed)
    catalog = _Catalog(num_items, rng, zipf_exponent)
    lengths, views = _views(catalog, num_users, rng)
    view_users = np.repeat(np.arange(num_users), lengths)
    view_items = views[np.arange(views.shape[1]) < lengths[:, None]]  # (V,) row-major: by user, then step

    num_views = len(view_items)
    cart = rng.random(num_views) < CART_AFTER_VIEW
    buy = rng.random(num_views) < np.where(cart, BUY_AFTER_CART, BUY_WITHOUT_CART)
    present = np.stack([np.ones(num_views, bool), rng.random(num_views) < FAV_AFTER_VIEW, cart, buy], axis=1)
    per_view = present.sum(axis=1)  # each view expands into pv[, fav][, cart][, buy] on the same item
    behavior_codes = np.tile(np.arange(len(BEHAVIOR_NAMES)), num_views)[present.ravel()]
    event_users = np.repeat(view_users, per_view)
    event_items = np.repeat(view_items, per_view)

    is_view = behavior_codes == 0
    view_gap = np.round(rng.lognormal(np.log(60), 1.0, len(event_users)))
    session_break = rng.integers(3600, 86400, len(event_users))
    follow_up_gap = np.round(rng.lognormal(np.log(20), 0.8, len(event_users)))
    gaps = 1 + np.where(is_view, np.where(rng.random(len(event_users)) < SESSION_BREAK_PROBABILITY,
                                          session_break, view_gap), follow_up_gap).astype(np.int64)
    per_user = np.bincount(event_users, minlength=num_users)
    first_event = np.cumsum(per_user) - per_user
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first_event], per_user)  # 0 at each user's first event
    user_start = START_TIME + rng.integers(0, WINDOW_SECONDS, num_users)
    timestamps = user_start[event_users] + elapsed

    user_names = np.array([f"u{u}" for u in range(num_users)], dtype=object)
    return Interactions(
        user_ids=user_names[event_users],
        item_ids=_item_id(np.arange(1, num_items + 1))[event_items],
        timestamps=timestamps.astype(np.int64),
        behaviors=np.array(BEHAVIOR_NAMES, dtype=object)[behavior_codes],
        source=f"synthetic(num_users={num_users}, num_items={num_items}, seed={seed}"
               + (f", zipf_exponent={zipf_exponent})" if zipf_exponent != ZIPF_EXPONENT else ")"),
    )


def generate_attributes(item_ids, seed: int = 0) -> dict[str, list[str]]:
    """{raw_item_id: [category, brand]} for synthetic ids; the category is the item's latent cluster, so side
    information carries real signal, and the brand is one of BRANDS_PER_CLUSTER per category (hashed by seed)."""
    numbers = []
    for raw_item_id in item_ids:
        match = SYNTHETIC_ITEM.fullmatch(str(raw_item_id))
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"item id {raw_item_id!r} is not a synthetic id like 'sku-00042'")
        numbers.append(int(match.group(1)))
    clusters = (np.array(numbers, dtype=np.int64) - 1) // CLUSTER_SIZE
    mixed = (np.array(numbers, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed % 2**32)) % np.uint64(2**32)
    brands = clusters * BRANDS_PER_CLUSTER + (mixed >> np.uint64(16)).astype(np.int64) % BRANDS_PER_CLUSTER
    return {str(raw): [f"cat-{c:03d}", f"brand-{b:04d}"] for raw, c, b in zip(item_ids, clusters, brands)}


def write_synthetic_dataset(out_dir, num_users: int = 2000, num_items: int = 500, seed: int = 0,
                            zipf_exponent: float = ZIPF_EXPONENT) -> tuple[Path, Path]:
    """Write events.csv (header user_id,item_id,timestamp,event_type) and attributes.json; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = generate_log(num_users, num_items, seed, zipf_exponent)
    events_path, attributes_path = out_dir / "events.csv", out_dir / "attributes.json"
    pd.DataFrame({"user_id": log.user_ids, "item_id": log.item_ids, "timestamp": log.timestamps,
                  "event_type": log.behaviors}).to_csv(events_path, index=False)
    attributes = generate_attributes(_item_id(np.arange(1, num_items + 1)), seed)
    attributes_path.write_text(json.dumps(attributes, indent=0))
    return events_path, attributes_path
