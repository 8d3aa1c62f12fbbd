"""Where data enters: a raw interaction log → `Interactions` → `SequenceData`, the one layout everything consumes.

Three input formats (plain or gzip-compressed text; `detect_format` tells them apart):
  events  CSV or Parquet, one event per row: user_id, item_id, timestamp[, event_type]. A CSV header may use
          the aliases in COLUMN_ALIASES; a headerless CSV is read by its column count: 3 = user,item,timestamp;
          4 = user,item,timestamp,event_type; 5 = Taobao UserBehavior (user,item,category,behavior,timestamp).
  s3rec   one line per user, `user item item ...`, oldest first (S3-Rec's Beauty.txt).
  sasrec  one `user item` pair per line, in time order (SASRec's ml-1m.txt).

Rules for imperfect input (anything else unusable is a DataError naming the file and the 1-based line):
  - Raw user and item ids are kept as strings ("123" stays "123"); surrounding whitespace is stripped.
  - Timestamps: integer seconds (fractions are truncated) or ISO 8601 datetimes (naive ones are read as UTC);
    the first row decides which. Formats without time use the position in the file, so file order is time order.
  - Unsorted timestamps are not an error: each user's events are sorted stably, so ties keep file order.
  - Blank lines are skipped. Exact duplicate events (same user, item, timestamp and behaviour) are dropped;
    in s3rec/sasrec files the position is the time, so a repeated item there is a real repeat and is kept.
  - Users left with fewer than MIN_EVENTS_PER_USER events are dropped and counted in the log, because
    leave-one-out needs a train, a valid and a test event per user (the temporal protocol keeps every user);
    k-core filtering (off by default) counts events, not distinct items.

Evaluation protocols (docs/training.md, "Evaluation protocols"): leave-one-out holds out each user's last two
events; the temporal protocol (`TemporalSplit`) cuts every user's sequence at two points in time.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.training.vocab import BEHAVIOR_ORDER, PAD_INDEX

logger = logging.getLogger(__name__)

FORMATS = ("events", "s3rec", "sasrec")
MIN_EVENTS_PER_USER = 3  # leave-one-out: at least one train event, one valid target, one test target
DETECT_LINES = 1000  # lines `detect_format` reads; enough to see a multi-item s3rec line in any real file
SPLIT_CUT = {"train": 2, "valid": 2, "test": 1}  # leave-one-out: events cut from the end of each user's sequence
PREPROCESSING_VERSION = 1  # part of the fingerprint; bump when build_sequences changes its output
COLUMN_ALIASES = {
    "user_id": ("user_id", "user", "userid", "uid", "visitor_id", "visitorid"),
    "item_id": ("item_id", "item", "itemid", "iid", "sku", "product_id"),
    "timestamp": ("timestamp", "ts", "time", "datetime", "event_time"),
    "event_type": ("event_type", "behavior", "behavior_type", "behaviour", "behaviour_type", "event", "action"),
}
HEADERLESS_COLUMNS = {
    3: ("user_id", "item_id", "timestamp"),
    4: ("user_id", "item_id", "timestamp", "event_type"),
    5: ("user_id", "item_id", "category_id", "event_type", "timestamp"),  # Taobao UserBehavior.csv
}

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"


class DataError(ValueError):
    """Unusable input data; the message names the file and, when known, the 1-based line (or Parquet row)."""

    def __init__(self, source, reason: str, line: int | None = None, unit: str = "line"):
        self.source, self.reason, self.line, self.unit = str(source), reason, line, unit
        where = self.source if line is None else f"{self.source}, {unit} {line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep the exception picklable (multiprocessing, Ray) despite the custom signature
        return (DataError, (self.source, self.reason, self.line, self.unit))


@dataclass(frozen=True, eq=False)
class Interactions:
    """One row per parsed event, before preprocessing; ids and behaviour names are str (object arrays)."""

    user_ids: np.ndarray  # (N,) raw user ids
    item_ids: np.ndarray  # (N,) raw item ids
    timestamps: np.ndarray  # (N,) int64 seconds, or the position in the file for formats without time
    behaviors: np.ndarray | None  # (N,) behaviour names, None when the format has none
    source: str  # file path (or a description of a generated log), for messages and the fingerprint

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class SplitProtocol:
    """How held-out targets are chosen: the resolved `data.protocol` settings (config.DataConfig).

    Cutoffs below 1 are quantiles of the event times, others Unix seconds; `target_behavior` "" = any event."""

    name: str = "leave_one_out"  # leave_one_out | temporal
    valid_cutoff: float = 0.8
    test_cutoff: float = 0.9
    target_behavior: str = ""

    @property
    def temporal(self) -> bool:
        return self.name == "temporal"


@dataclass(frozen=True, eq=False)
class TemporalSplit:
    """Per-user event offsets of a temporal split (absolute positions into SequenceData.items).

    Training input: events before the valid cutoff, [offsets[u], train_end[u]). Valid: that same history, target
    the first event (of the target behaviour) in [valid cutoff, test cutoff). Test: the history before the test
    cutoff, [offsets[u], test_end[u]), target the first event (of the target behaviour) at or after it."""

    valid_cutoff_s: int
    test_cutoff_s: int
    train_end: np.ndarray  # (U,) int64
    test_end: np.ndarray  # (U,) int64
    valid_target: np.ndarray  # (U,) int64 position of the valid target; meaningful where has_valid
    has_valid: np.ndarray  # (U,) bool
    test_target: np.ndarray  # (U,) int64
    has_test: np.ndarray  # (U,) bool


@dataclass(frozen=True, eq=False)
class SequenceData:
    """Per-user event sequences in CSR layout: user u's events are items[offsets[u]:offsets[u+1]], oldest first."""

    user_ids: np.ndarray  # (U,) raw user id of internal user u
    item_ids: np.ndarray  # (I+1,) raw item id of each item index; item_ids[PAD_INDEX] = ""
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (E,) int32 item indices 1..I
    behaviors: np.ndarray | None  # (E,) int8 behaviour indices 1..B, 0 never occurs
    behavior_names: tuple[str, ...]  # index b is behavior_names[b-1]
    item_attributes: np.ndarray | None  # (I+1, A_max) int32 attribute indices, 0 = pad
    num_attributes: int  # A
    fingerprint: str  # sha256 of the source bytes + preprocessing settings
    timestamps: np.ndarray | None = None  # (E,) int64 seconds (file positions for formats without time)
    temporal: TemporalSplit | None = None  # None = leave-one-out

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_behaviors(self) -> int:
        return len(self.behavior_names)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---------------------------------------------------------------------------------------------- reading files


def _read_bytes_head(path: Path, size: int = 4) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise DataError(path, f"cannot open: {exc.strerror or exc}") from None


def _open_text(path: Path):
    """Text handle on `path`, decompressing gzip by its magic bytes rather than trusting the suffix."""
    if _read_bytes_head(path, 2) == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _read_lines(path: Path, limit: int | None = None) -> list[str]:
    try:
        with _open_text(path) as handle:
            if limit is None:
                return handle.read().split("\n")
            return [line for _, line in zip(range(limit), handle)]
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError
        raise DataError(path, f"cannot read: {exc}") from None


def detect_format(path) -> str:
    """"events" (Parquet, or text whose first line has a comma), "s3rec" (a line with 3+ tokens) or "sasrec"."""
    path = Path(path)
    if _read_bytes_head(path) == PARQUET_MAGIC:
        return "events"
    numbered = [(n, line.strip()) for n, line in enumerate(_read_lines(path, DETECT_LINES), 1) if line.strip()]
    if not numbered:
        raise DataError(path, "empty file: no events")
    if "," in numbered[0][1]:
        return "events"
    for line_number, line in numbered:
        if len(line.split()) < 2:
            raise DataError(path, f"unknown format: {line[:60]!r} is neither CSV nor `user item ...`", line_number)
    if any(len(line.split()) > 2 for _, line in numbered):
        return "s3rec"
    return "sasrec"  # every line is `user item`; as s3rec each user would have a single event


def _load_text(path: Path, fmt: str) -> Interactions:
    """s3rec (`user item item ...`) or sasrec (`user item`) lines; the position in the file is the timestamp."""
    users, counts, items = [], [], []
    for line_number, line in enumerate(_read_lines(path), 1):
        tokens = line.split()
        if tokens and (len(tokens) < 2 or (fmt == "sasrec" and len(tokens) > 2)):
            expected = "`user item`" if fmt == "sasrec" else "`user item item ...`"
            raise DataError(path, f"expected {expected}, got {len(tokens)} field(s)", line_number)
        if tokens:
            users.append(tokens[0])
            counts.append(len(tokens) - 1)
            items.extend(tokens[1:])
    if not items:
        raise DataError(path, "empty file: no events")
    user_ids = np.repeat(np.array(users, dtype=object), counts)
    return Interactions(user_ids, np.array(items, dtype=object), np.arange(len(items), dtype=np.int64), None, str(path))


def _resolve_columns(names: list[str], path: Path, unit: str) -> dict[str, str]:
    """Canonical column → the file's column name; DataError naming the missing one."""
    lowered = {str(name).strip().lower(): name for name in names}
    resolved = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        found = [lowered[alias] for alias in aliases if alias in lowered]
        if found:
            resolved[canonical] = found[0]
        elif canonical != "event_type":
            raise DataError(path, f"missing column {canonical} (accepted names: {', '.join(aliases)}); "
                                  f"columns are {', '.join(map(str, names))}", 1 if unit == "line" else None)
    return resolved


def _events_from_frame(frame: pd.DataFrame, columns: dict[str, str], path: Path, unit: str) -> Interactions:
    """Canonical columns of a CSV (all text) or Parquet (typed) table → Interactions; row i is `unit` i+1."""
    if frame.empty:
        raise DataError(path, "no events")
    frame = frame[list(columns.values())].set_axis(list(columns), axis=1)
    line_numbers = frame.index.to_numpy() + 1

    def reject(bad, reason: str, column: pd.Series) -> None:  # DataError at the first flagged row
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(path, reason.format(value=repr(column.iloc[row])), int(line_numbers[row]), unit)

    def strings(name: str) -> np.ndarray:  # ids and names; integral floats (Parquet with nulls) lose ".0"
        column = frame[name]
        if pd.api.types.is_float_dtype(column) and (column % 1 == 0).all():
            column = column.astype(np.int64)
        return column.astype(str).str.strip().to_numpy(dtype=object)

    for name in columns:  # a short CSV row reads as empty strings, a Parquet gap as null
        reject(frame[name].isna() | (frame[name].astype(str).str.strip() == ""), f"missing {name}", frame[name])
    stamps = frame["timestamp"]
    numeric = pd.to_numeric(stamps, errors="coerce") if not pd.api.types.is_datetime64_any_dtype(stamps) else None
    if numeric is not None and (pd.api.types.is_numeric_dtype(stamps) or not pd.isna(numeric.iloc[0])):
        reject(~np.isfinite(numeric.to_numpy(np.float64, na_value=np.nan)),
               "non-numeric timestamp {value}: expected integer seconds, like the first row", stamps)
        seconds = numeric.to_numpy(np.int64) if pd.api.types.is_integer_dtype(numeric) else \
            np.floor(numeric.to_numpy(np.float64)).astype(np.int64)
    else:  # datetimes, or strings that must all be ISO 8601
        parsed = pd.to_datetime(stamps, errors="coerce", utc=True, format="ISO8601")
        reject(parsed.isna(), "unparseable timestamp {value}: expected ISO 8601, like the first row", stamps)
        seconds = parsed.dt.as_unit("s").astype(np.int64).to_numpy()
    behaviors = strings("event_type") if "event_type" in columns else None
    return Interactions(strings("user_id"), strings("item_id"), seconds, behaviors, str(path))


def _load_events_csv(path: Path) -> Interactions:
    compression = "gzip" if _read_bytes_head(path, 2) == GZIP_MAGIC else None
    try:  # every field as text, blank lines kept as empty rows so that row i is line i+1
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            compression=compression, encoding="utf-8-sig")
    except pd.errors.ParserError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        raise DataError(path, f"malformed CSV row ({str(exc).split(': ')[-1].strip()})", line) from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file: no events") from None
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(path, f"cannot read as CSV: {exc}") from None
    blank = (frame == "").all(axis=1)
    header = {cell.strip().lower() for cell in frame.iloc[0]}
    if header.intersection(COLUMN_ALIASES["user_id"]) and header.intersection(COLUMN_ALIASES["item_id"]):
        frame = frame.set_axis(list(frame.iloc[0]), axis=1).iloc[1:]
        columns = _resolve_columns(list(frame.columns), path, "line")
        blank = blank.iloc[1:]
    elif frame.shape[1] in HEADERLESS_COLUMNS:
        names = HEADERLESS_COLUMNS[frame.shape[1]]
        frame = frame.set_axis(list(names), axis=1)
        columns = {name: name for name in names if name in COLUMN_ALIASES}
    else:
        raise DataError(path, f"headerless CSV with {frame.shape[1]} columns; expected 3 (user,item,timestamp), "
                              "4 (+event_type) or 5 (Taobao), or a header naming user_id,item_id,timestamp", 1)
    return _events_from_frame(frame[~blank.to_numpy()], columns, path, "line")


def _load_events_parquet(path: Path) -> Interactions:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(path, f"cannot read as Parquet: {exc}") from None
    columns = _resolve_columns(list(frame.columns), path, "row")
    return _events_from_frame(frame.reset_index(drop=True), columns, path, "row")


def load_interactions(path, fmt: str = "auto") -> Interactions:
    """Parse `path` in format `fmt` ("auto" detects it) into raw, unfiltered events."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise DataError(path, f"unknown format {fmt!r}; expected auto, {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("s3rec", "sasrec"):
        return _load_text(path, fmt)
    if _read_bytes_head(path) == PARQUET_MAGIC:
        return _load_events_parquet(path)
    return _load_events_csv(path)


# ------------------------------------------------------------------------------------------------ preprocessing


def load_attributes(path, item_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """JSON {raw_item_id: [attribute, ...]} → ((I+1, A_max) int32 attribute indices, A); 0 pads.

    `item_ids` is SequenceData.item_ids (PAD at 0). Attribute values are re-indexed 1..A in order of first
    appearance over the items; repeats within one item are dropped, and so is the empty string (index 0's name,
    the PAD); items absent from the file get no attributes. `attribute_vocabulary` names the indices.
    """
    matrix, values = _index_attributes(path, item_ids)
    return matrix, len(values) - 1


def attribute_vocabulary(path, item_ids) -> list[str]:
    """The raw value of each attribute index `load_attributes` gives for the same file and `item_ids`: A + 1
    strings, "" at the PAD index 0, the rest unique and non-empty (integers in the file read as their str)."""
    return _index_attributes(path, item_ids)[1]


def _index_attributes(path, item_ids) -> tuple[np.ndarray, list[str]]:
    """The one reading behind `load_attributes` and `attribute_vocabulary`: (matrix, [""] + values by index)."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg}", exc.lineno) from None
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(path, f"cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(path, "expected a JSON object {raw_item_id: [attribute, ...]}")
    attributes_of = {}
    for raw_item_id, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) for v in values):
            raise DataError(path, f"item {raw_item_id!r}: expected a list of strings or integers, got {values!r}")
        attributes_of[str(raw_item_id).strip()] = [v for v in dict.fromkeys(str(v) for v in values) if v != ""]
    per_item = [attributes_of.get(str(raw_item_id), []) for raw_item_id in item_ids[PAD_INDEX + 1:]]
    flat = [value for values in per_item for value in values]
    codes, uniques = pd.factorize(pd.Series(flat, dtype=object)) if flat else (np.zeros(0, np.int64), [])
    widths = np.array([len(values) for values in per_item], dtype=np.int64)
    matrix = np.zeros((len(item_ids), max(int(widths.max(initial=0)), 1)), dtype=np.int32)
    rows = np.repeat(np.arange(PAD_INDEX + 1, len(item_ids)), widths)
    slots = np.arange(len(flat)) - np.repeat(np.cumsum(widths) - widths, widths)
    matrix[rows, slots] = codes + 1
    return matrix, [""] + [str(value) for value in uniques]


def _ordered_behavior_names(names) -> tuple[str, ...]:
    known = [name for name in BEHAVIOR_ORDER if name in names]
    return tuple(known + sorted(set(names) - set(known)))


def _count_filter(user_codes: np.ndarray, item_codes: np.ndarray, kcore: int, min_events: int) -> np.ndarray:
    """Keep-mask after iteratively removing users under max(kcore, min_events) and items under kcore events."""
    min_user_events = max(kcore, min_events)
    keep = np.ones(len(user_codes), dtype=bool)
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=user_codes.max(initial=0) + 1)
        item_counts = np.bincount(item_codes[keep], minlength=item_codes.max(initial=0) + 1)
        still = keep & (user_counts[user_codes] >= min_user_events) & (item_counts[item_codes] >= kcore)
        if still.sum() == keep.sum():
            return keep
        keep = still


def _fingerprint(interactions: Interactions, settings: dict) -> str:
    digest = hashlib.sha256()
    source = Path(interactions.source)
    if source.is_file():
        with open(source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:  # generated in memory: hash the events themselves
        for column in (interactions.user_ids, interactions.item_ids, interactions.behaviors):
            if column is not None:
                digest.update("\x1f".join(column).encode())
        digest.update(interactions.timestamps.astype(np.int64).tobytes())
    if settings["attributes"]:
        digest.update(Path(settings["attributes"]).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def build_sequences(
    interactions: Interactions, *, kcore: int = 0, max_events_per_user: int = 0, attributes_path: str = "",
    protocol: SplitProtocol = SplitProtocol(),
) -> SequenceData:
    """Dedupe, sort each user's events stably by time, keep the newest `max_events_per_user` (0 = all),
    k-core filter, drop users under MIN_EVENTS_PER_USER (leave-one-out only), then index users and items by first
    appearance; a temporal `protocol` then cuts each user's sequence (`temporal_split`)."""
    source = interactions.source
    min_events = 1 if protocol.temporal else MIN_EVENTS_PER_USER
    if kcore < 0 or max_events_per_user < 0:
        raise ValueError(f"kcore and max_events_per_user must be >= 0, got {kcore} and {max_events_per_user}")
    if len(interactions) == 0:
        raise DataError(source, "no events")
    user_codes, raw_users = pd.factorize(interactions.user_ids)  # codes follow first appearance in the file
    item_codes, raw_items = pd.factorize(interactions.item_ids)
    behavior_names: tuple[str, ...] = ()
    behavior_codes = np.zeros(len(interactions), dtype=np.int64)
    if interactions.behaviors is not None:
        behavior_names = _ordered_behavior_names(set(interactions.behaviors))
        if len(behavior_names) > np.iinfo(np.int8).max:
            raise DataError(source, f"{len(behavior_names)} behaviour types; at most {np.iinfo(np.int8).max}")
        behavior_codes = pd.Index(behavior_names).get_indexer(interactions.behaviors) + 1
    timestamps = np.asarray(interactions.timestamps, dtype=np.int64)

    events = pd.DataFrame({"u": user_codes, "i": item_codes, "t": timestamps, "b": behavior_codes})
    kept = np.flatnonzero(~events.duplicated().to_numpy())
    num_duplicates = len(interactions) - len(kept)
    kept = kept[np.argsort(timestamps[kept], kind="stable")]  # two stable sorts = sort by (user, time), ties in
    kept = kept[np.argsort(user_codes[kept], kind="stable")]  # file order
    if max_events_per_user:
        per_user = np.bincount(user_codes[kept])
        position = np.arange(len(kept)) - (np.cumsum(per_user) - per_user)[user_codes[kept]]
        kept = kept[position >= per_user[user_codes[kept]] - max_events_per_user]
    kept = kept[_count_filter(user_codes[kept], item_codes[kept], kcore, min_events)]
    if len(kept) == 0:
        raise DataError(source, f"no user has at least {max(kcore, min_events)} events "
                                f"after deduplication{' and k-core' if kcore else ''}")

    user_index, user_order = pd.factorize(user_codes[kept])  # ascending codes, so first-appearance order
    item_index, item_order = pd.factorize(item_codes[kept])  # first appearance in (user, time) order
    offsets = np.zeros(len(user_order) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_index, minlength=len(user_order)), out=offsets[1:])
    item_ids = np.concatenate([np.array([""], dtype=object), np.asarray(raw_items, dtype=object)[item_order]])
    num_dropped_users = len(raw_users) - len(user_order)
    logger.info("%s: dropped %d duplicate events and %d users (fewer than %d events%s); %d users, %d items, "
                "%d events remain", source, num_duplicates, num_dropped_users, max(kcore, min_events),
                f", {kcore}-core" if kcore else "", len(user_order), len(item_order), len(kept))

    item_attributes, num_attributes = None, 0
    if attributes_path:
        item_attributes, num_attributes = load_attributes(attributes_path, item_ids)
    settings = {"kcore": kcore, "max_events_per_user": max_events_per_user, "attributes": attributes_path,
                "min_events_per_user": min_events, "version": PREPROCESSING_VERSION}
    if protocol.temporal:  # only then: leave-one-out fingerprints stay those of the runs already trained
        settings["protocol"] = dataclasses.asdict(protocol)
    data = SequenceData(
        user_ids=np.asarray(raw_users, dtype=object)[user_order],
        item_ids=item_ids,
        offsets=offsets,
        items=(item_index + PAD_INDEX + 1).astype(np.int32),
        behaviors=behavior_codes[kept].astype(np.int8) if behavior_names else None,
        behavior_names=behavior_names,
        item_attributes=item_attributes,
        num_attributes=num_attributes,
        fingerprint=_fingerprint(interactions, settings),
        timestamps=timestamps[kept],
    )
    if not protocol.temporal:
        return data
    return dataclasses.replace(data, temporal=temporal_split(data, protocol))


# ------------------------------------------------------------------------------------------ evaluation splits


def resolve_cutoff(value: float, timestamps: np.ndarray) -> int:
    """A cutoff setting in Unix seconds: a value below 1 is a quantile q of the event times, read as the time of
    the event at rank floor(q * E) in time order (so about a share q of the events lies before it)."""
    if value <= 0:
        raise ValueError(f"cutoff: must be a quantile in (0, 1) or Unix seconds >= 1, got {value}")
    if value >= 1:
        return int(value)
    rank = min(int(value * len(timestamps)), len(timestamps) - 1)
    return int(np.partition(timestamps, rank)[rank])


def _first_in_window(user_of_event: np.ndarray, eligible: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(U,) position of each user's first eligible event, and (U,) whether there is one; positions ascend."""
    positions = np.flatnonzero(eligible)
    users, first = np.unique(user_of_event[positions], return_index=True)
    found = np.zeros(num_users, dtype=bool)
    position = np.zeros(num_users, dtype=np.int64)
    found[users] = True
    position[users] = positions[first]
    return position, found


def temporal_split(data: SequenceData, protocol: SplitProtocol) -> TemporalSplit:
    """Cut every user's time-sorted sequence at the valid and the test cutoff (see `TemporalSplit`)."""
    if data.timestamps is None:
        raise ValueError("data.protocol: temporal needs event times")
    valid_cutoff = resolve_cutoff(protocol.valid_cutoff, data.timestamps)
    test_cutoff = resolve_cutoff(protocol.test_cutoff, data.timestamps)
    if not valid_cutoff < test_cutoff:
        raise ValueError(f"data.valid_cutoff: resolves to {valid_cutoff} s, not before data.test_cutoff "
                         f"({test_cutoff} s)")
    lengths = data.lengths()
    user_of_event = np.repeat(np.arange(data.num_users), lengths)  # (E,)
    starts = data.offsets[:-1]
    train_end = starts + np.bincount(user_of_event, weights=data.timestamps < valid_cutoff,
                                     minlength=data.num_users).astype(np.int64)
    test_end = starts + np.bincount(user_of_event, weights=data.timestamps < test_cutoff,
                                    minlength=data.num_users).astype(np.int64)
    target = np.ones(len(data.items), dtype=bool)
    if protocol.target_behavior:
        if protocol.target_behavior not in data.behavior_names:
            raise ValueError(f"data.target_behavior: {protocol.target_behavior!r} is not a behaviour of the data "
                             f"({', '.join(data.behavior_names) or 'it has none'})")
        target = data.behaviors == data.behavior_names.index(protocol.target_behavior) + 1
    position = np.arange(len(data.items))
    in_valid = (position >= train_end[user_of_event]) & (position < test_end[user_of_event])
    in_test = position >= test_end[user_of_event]
    valid_target, has_valid = _first_in_window(user_of_event, target & in_valid, data.num_users)
    test_target, has_test = _first_in_window(user_of_event, target & in_test, data.num_users)
    return TemporalSplit(valid_cutoff, test_cutoff, train_end, test_end, valid_target, has_valid, test_target,
                         has_test)


# ---------------------------------------------------------------------------------------------- leave-one-out


def history_bounds(data: SequenceData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) offsets per user of the model input for `split`. Leave-one-out: train and valid see
    [start, end_all-2), test sees [start, end_all-1). Temporal: train and valid see the events before the valid
    cutoff, test those before the test cutoff (`TemporalSplit`)."""
    if split not in SPLIT_CUT:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLIT_CUT)}")
    if data.temporal is not None:
        end = data.temporal.test_end if split == "test" else data.temporal.train_end
        return data.offsets[:-1].copy(), end.copy()
    return data.offsets[:-1].copy(), data.offsets[1:] - SPLIT_CUT[split]


def target_positions(data: SequenceData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """((U,) position in data.items of each user's `split` target, (U,) bool: the user is evaluated, i.e. has a
    target and a non-empty input). Leave-one-out: the event right after the input; positions are meaningful only
    where evaluated."""
    if split not in ("valid", "test"):
        raise ValueError(f"split {split!r}: targets exist for valid and test only")
    start, end = history_bounds(data, split)
    if data.temporal is None:
        return end, end > start
    split_of = data.temporal
    position, has = (split_of.valid_target, split_of.has_valid) if split == "valid" else \
        (split_of.test_target, split_of.has_test)
    return position.copy(), has & (end > start)


def targets(data: SequenceData, split: str) -> np.ndarray:
    """(U,) item index each user's `split` input must predict (see `target_positions` for who has one)."""
    position, _ = target_positions(data, split)
    return data.items[position].astype(np.int64)
