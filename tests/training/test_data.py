"""seqrank.training.data: the three formats, preprocessing rules, id maps, leave-one-out, and every bad-input message."""

import gzip
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqrank.training.config import DataConfig
from seqrank.training.data import (
    DataError,
    Interactions,
    build_sequences,
    detect_format,
    history_bounds,
    load_attributes,
    load_interactions,
    targets,
)
from seqrank.training.sources import load_sequences
from seqrank.training.synthetic import generate_log
from seqrank.training.vocab import PAD_INDEX

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BEAUTY = SHARED_DATA / "amazon-beauty" / "Beauty.txt"
BEAUTY_ATTRIBUTES = SHARED_DATA / "amazon-beauty" / "Beauty_item2attributes.json"
TAOBAO = SHARED_DATA / "taobao-userbehavior-prefix" / "UserBehavior_prefix.csv.gz"


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data not mounted)")
    return path


def interactions(rows, behaviors=True) -> Interactions:
    """rows of (user, item, timestamp[, behavior]) → Interactions."""
    users, items, stamps = (np.array([r[i] for r in rows], dtype=object) for i in range(3))
    names = np.array([r[3] for r in rows], dtype=object) if behaviors else None
    return Interactions(users, items, stamps.astype(np.int64), names, "memory")


def raw_pairs(data) -> list[tuple[str, str]]:
    users = np.repeat(data.user_ids, data.lengths())
    return list(zip(users, data.item_ids[data.items]))


# ------------------------------------------------------------------------------------------ formats, detection


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("log.csv", "user_id,item_id,timestamp\nu1,a,1\n", "events"),
        ("log.csv.gz", "1,10,100,pv,1511544070\n", "events"),
        ("Beauty.txt", "1 1 2 3\n2 4 5\n", "s3rec"),
        ("beauty.txt.gz", "\n1 1 2 3\n", "s3rec"),
        ("ml.txt", "1 1\n1 2\n2 3\n", "sasrec"),
    ],
)
def test_detect_format(tmp_path, name, text, expected):
    assert detect_format(write(tmp_path / name, text)) == expected


def test_detect_format_parquet(tmp_path):
    path = tmp_path / "events.data"  # detected by content, not by suffix
    pd.DataFrame({"user_id": ["u"], "item_id": ["i"], "timestamp": [1]}).to_parquet(path)
    assert detect_format(path) == "events"


def test_s3rec_lines_become_events_in_file_order(tmp_path):
    loaded = load_interactions(write(tmp_path / "s.txt", "7 3 1 3\n\n9 sku-1 3\n"))
    assert list(loaded.user_ids) == ["7", "7", "7", "9", "9"]
    assert list(loaded.item_ids) == ["3", "1", "3", "sku-1", "3"]
    assert list(loaded.timestamps) == [0, 1, 2, 3, 4]
    assert loaded.behaviors is None
    data = build_sequences(loaded)
    assert raw_pairs(data) == [("7", "3"), ("7", "1"), ("7", "3")]  # a repeat in a text format is kept


def test_sasrec_pairs(tmp_path):
    loaded = load_interactions(write(tmp_path / "s.txt.gz", "1 5\n1 6\n2 5\n1 7\n"))
    assert list(zip(loaded.user_ids, loaded.item_ids)) == [("1", "5"), ("1", "6"), ("2", "5"), ("1", "7")]
    data = build_sequences(loaded, kcore=0)
    assert raw_pairs(data) == [("1", "5"), ("1", "6"), ("1", "7")]  # user 2 has one event: dropped


def test_csv_with_aliases_string_ids_and_unsorted_time(tmp_path):
    path = write(tmp_path / "e.csv", "UserID,sku,ts,action\nu1,SKU-9,300,buy\nu1,0042,100,pv\nu2,x,5,pv\n"
                                     "u1,SKU-9,200,cart\nu2,y,5,pv\nu2,z,4,pv\n")
    loaded = load_interactions(path)
    assert list(loaded.item_ids[:2]) == ["SKU-9", "0042"]  # raw strings, leading zeros kept
    data = build_sequences(loaded)
    assert raw_pairs(data) == [("u1", "0042"), ("u1", "SKU-9"), ("u1", "SKU-9"), ("u2", "z"), ("u2", "x"), ("u2", "y")]
    assert data.behavior_names == ("pv", "cart", "buy")
    assert [data.behavior_names[b - 1] for b in data.behaviors[:3]] == ["pv", "cart", "buy"]


def test_headerless_taobao_layout_and_iso_timestamps(tmp_path):
    taobao = load_interactions(write(tmp_path / "t.csv", "1,10,77,pv,1511544070\n1,11,77,fav,1511544080\n"))
    assert list(taobao.item_ids) == ["10", "11"] and list(taobao.behaviors) == ["pv", "fav"]
    assert list(taobao.timestamps) == [1511544070, 1511544080]
    iso = load_interactions(write(tmp_path / "i.csv", "u,i,2017-11-25T10:00:00Z\nu,j,2017-11-25 10:00:05\n"))
    assert list(iso.timestamps) == [1511604000, 1511604005]  # naive datetimes read as UTC


def test_parquet_typed_columns(tmp_path):
    path = tmp_path / "e.parquet"
    pd.DataFrame({"user": [5, 5, 6], "item": [42, 43, 42], "behavior_type": ["pv", "buy", "pv"],
                  "time": pd.to_datetime(["2017-11-25 10:00:00", "2017-11-25 10:00:09", "2017-11-26 00:00:00"])}) \
        .to_parquet(path)
    loaded = load_interactions(path)
    assert list(loaded.user_ids) == ["5", "5", "6"] and list(loaded.item_ids) == ["42", "43", "42"]
    assert list(loaded.timestamps) == [1511604000, 1511604009, 1511654400]
    assert list(loaded.behaviors) == ["pv", "buy", "pv"]


# ---------------------------------------------------------------------------------------------- preprocessing


def test_exact_duplicates_dropped_only_when_identical():
    rows = [("u", "a", 1, "pv"), ("u", "a", 1, "pv"), ("u", "a", 1, "cart"), ("u", "a", 2, "pv"), ("u", "b", 3, "pv")]
    data = build_sequences(interactions(rows))
    assert len(data.items) == 4
    assert [data.behavior_names[b - 1] for b in data.behaviors] == ["pv", "cart", "pv", "pv"]


def test_ties_keep_file_order():
    rows = [("u", "c", 5, "pv"), ("u", "a", 1, "pv"), ("u", "b", 5, "pv"), ("u", "d", 5, "pv")]
    data = build_sequences(interactions(rows))
    assert [item for _, item in raw_pairs(data)] == ["a", "c", "b", "d"]


def test_kcore_cascades_and_counts_events():
    rows = [(u, i, t, "pv") for u in ("u1", "u2", "u3") for t, i in enumerate(("i1", "i2", "i3"))]
    rows += [("u4", "i1", 0, "pv"), ("u4", "i2", 1, "pv"), ("u4", "i4", 2, "pv")]  # i4 rare → u4 falls to 2 events
    rows += [("u5", "i6", t, "pv") for t in range(3)]  # one item three times: 3 events each way
    kept = build_sequences(interactions(rows), kcore=3)
    assert list(kept.user_ids) == ["u1", "u2", "u3", "u5"]
    assert sorted(kept.item_ids[1:]) == ["i1", "i2", "i3", "i6"]
    unfiltered = build_sequences(interactions(rows), kcore=0)
    assert "u4" in unfiltered.user_ids and "i4" in unfiltered.item_ids


def test_kcore_invariant_on_synthetic_log():
    log = generate_log(300, 200, seed=3)
    data = build_sequences(log, kcore=10)
    assert data.lengths().min() >= 10
    assert np.bincount(data.items)[1:].min() >= 10
    assert data.num_items < len(set(log.item_ids)) and data.num_users < 300


def test_users_below_three_events_dropped_and_counted(caplog):
    rows = [("a", "x", 0), ("a", "y", 1), ("a", "z", 2), ("b", "x", 0), ("c", "x", 0), ("c", "y", 1)]
    with caplog.at_level(logging.INFO, logger="seqrank.training.data"):
        data = build_sequences(interactions(rows, behaviors=False))
    assert list(data.user_ids) == ["a"]
    assert "2 users" in caplog.text


def test_max_events_per_user_keeps_the_newest():
    rows = [("u", f"i{t}", t, "pv") for t in range(6)]
    data = build_sequences(interactions(rows[::-1]), max_events_per_user=4)
    assert [item for _, item in raw_pairs(data)] == ["i2", "i3", "i4", "i5"]


def test_id_maps_round_trip_and_contiguous_indices():
    log = generate_log(200, 80, seed=1)
    data = build_sequences(log)
    frame = pd.DataFrame({"u": log.user_ids, "i": log.item_ids, "t": log.timestamps, "b": log.behaviors})
    frame = frame.drop_duplicates()
    assert raw_pairs(data) == list(zip(frame["u"], frame["i"]))  # synthetic log is grouped by user, in time order
    assert data.item_ids[PAD_INDEX] == "" and data.items.min() == 1 and data.items.max() == data.num_items
    assert len(set(data.item_ids)) == data.num_items + 1
    first_seen = pd.Series(data.items).drop_duplicates().to_numpy()
    assert np.array_equal(first_seen, np.arange(1, data.num_items + 1))  # indices in order of first appearance
    item_index_of = {raw: index for index, raw in enumerate(data.item_ids)}
    assert all(item_index_of[data.item_ids[i]] == i for i in range(data.num_items + 1))


def test_fingerprint_tracks_bytes_and_settings(tmp_path):
    path = write(tmp_path / "s.txt", "1 1 2 3\n2 2 3 4\n")
    first = build_sequences(load_interactions(path)).fingerprint
    assert build_sequences(load_interactions(path)).fingerprint == first
    assert build_sequences(load_interactions(path), max_events_per_user=3).fingerprint != first
    write(path, "1 1 2 3\n2 2 3 5\n")
    assert build_sequences(load_interactions(path)).fingerprint != first
    assert build_sequences(generate_log(50, 20, 0)).fingerprint != build_sequences(generate_log(50, 20, 1)).fingerprint


def test_attributes_reindexed_and_padded(tmp_path):
    path = write(tmp_path / "a.json", '{"a": [7, 8], "b": ["8", 9, 9], "zzz": [100]}')
    matrix, num_attributes = load_attributes(path, np.array(["", "a", "b", "c"], dtype=object))
    assert num_attributes == 3  # 7, 8, 9; the attribute of an unknown item is not counted
    assert matrix.dtype == np.int32
    assert matrix.tolist() == [[0, 0], [1, 2], [2, 3], [0, 0]]


def test_load_sequences_from_config(tmp_path):
    synthetic = load_sequences(DataConfig(synthetic_users=120, synthetic_items=60, synthetic_seed=2))
    assert synthetic.num_users == 120 and synthetic.behavior_names == ("pv", "cart", "fav", "buy")
    path = write(tmp_path / "s.txt", "1 1 2 3\n2 2 3 4 5\n")
    from_file = load_sequences(DataConfig(path=str(path), format="s3rec"))
    assert list(from_file.lengths()) == [3, 4]


# ---------------------------------------------------------------------------------------------- leave-one-out


def test_leave_one_out_bounds_and_targets():
    data = build_sequences(generate_log(300, 100, seed=4))
    train_start, train_end = history_bounds(data, "train")
    valid_start, valid_end = history_bounds(data, "valid")
    test_start, test_end = history_bounds(data, "test")
    end_all = data.offsets[1:]
    assert np.array_equal(train_start, data.offsets[:-1]) and np.array_equal(valid_start, test_start)
    assert (train_end - train_start >= 1).all()
    for split, position in (("valid", end_all - 2), ("test", end_all - 1)):
        assert not ((position >= train_start) & (position < train_end)).any()  # targets never in train input
        assert np.array_equal(targets(data, split), data.items[position])
    for u in range(data.num_users):
        test_history = data.items[test_start[u] : test_end[u]]
        valid_history = data.items[valid_start[u] : valid_end[u]]
        assert np.array_equal(test_history, np.append(valid_history, targets(data, "valid")[u]))
    with pytest.raises(ValueError, match="train"):
        targets(data, "train")
    with pytest.raises(ValueError, match="split 'dev'"):
        history_bounds(data, "dev")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, text, fmt, line, reason",
    [
        ("auto.txt", "1 2 3\n2 4 5\n3\n", "auto", 3, "unknown format"),
        ("s3rec.txt", "1 2 3\n\n2\n", "s3rec", 3, "expected `user item item ...`"),
        ("sasrec.txt", "1 2\n1 3\n2 4 5\n", "sasrec", 3, "expected `user item`"),
        ("nocol.csv", "user_id,item_id,event_type\nu,i,pv\n", "auto", 1, "missing column timestamp"),
        ("twocol.csv", "u,i\n", "auto", 1, "headerless CSV with 2 columns"),
        ("short.csv", "u,i,1\nu,j,2\nu,k\n", "auto", 3, "missing timestamp"),
        ("long.csv", "u,i,1\nu,j,2\n\nu,k,3,pv\n", "auto", 4, "malformed CSV row"),
        ("text.csv", "u,i,1\nu,j,2\nu,k,noon\n", "auto", 3, "non-numeric timestamp 'noon'"),
        ("iso.csv", "u,i,2017-11-25T10:00\nu,j,1511604000\n", "auto", 2, "unparseable timestamp '1511604000'"),
        ("nouser.csv.gz", "user,item,ts\nu,i,1\n ,j,2\n", "events", 3, "missing user_id"),
        ("nobehavior.csv", "u,i,1,pv\nu,j,2,\n", "auto", 2, "missing event_type"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, text, fmt, line, reason):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as caught:
        load_interactions(path, fmt)
    assert f"{path}, line {line}: " in str(caught.value)
    assert reason in str(caught.value)
    assert caught.value.line == line


@pytest.mark.parametrize("name, text", [("empty.csv", ""), ("blank.txt", "\n  \n"), ("empty.txt.gz", "")])
def test_empty_file(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=f"^{path}: empty file"):
        load_interactions(path)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError, match=f"^{missing}: cannot open"):
        load_interactions(missing)
    truncated = tmp_path / "cut.txt.gz"
    compressed = gzip.compress(" ".join(map(str, range(5000))).encode())
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=f"^{truncated}: cannot read"):
        load_interactions(truncated, "s3rec")
    broken_parquet = tmp_path / "broken.parquet"
    broken_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=f"^{broken_parquet}: cannot read as Parquet"):
        load_interactions(broken_parquet)
    with pytest.raises(DataError, match="unknown format 'json'"):
        load_interactions(truncated, "json")


def test_parquet_gap_names_the_row(tmp_path):
    path = tmp_path / "e.parquet"
    pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "b", "c"], "timestamp": [1.0, np.nan, 3.0]}) \
        .to_parquet(path)
    with pytest.raises(DataError, match=f"^{path}, row 2: missing timestamp"):
        load_interactions(path)
    pd.DataFrame({"user_id": ["u"], "item": ["a"]}).to_parquet(path)
    with pytest.raises(DataError, match=f"^{path}: missing column timestamp"):
        load_interactions(path)


def test_single_event_users_only_is_an_error(tmp_path):
    path = write(tmp_path / "s.txt", "1 1\n2 1\n")
    with pytest.raises(DataError, match=f"^{path}: no user has at least 3 events"):
        build_sequences(load_interactions(path, "s3rec"))


def test_bad_attributes(tmp_path):
    item_ids = np.array(["", "a"], dtype=object)
    bad_json = write(tmp_path / "a.json", '{\n"a": [1,\n}')
    with pytest.raises(DataError, match=f"^{bad_json}, line 3: invalid JSON"):
        load_attributes(bad_json, item_ids)
    nested = write(tmp_path / "b.json", '{"a": [[1]]}')
    with pytest.raises(DataError, match=f"^{nested}: item 'a': expected a list"):
        load_attributes(nested, item_ids)


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_beauty_slice(tmp_path):
    lines = need(BEAUTY).read_text().splitlines()[:300]
    path = write(tmp_path / "beauty_head.txt", "\n".join(lines) + "\n")
    data = build_sequences(load_interactions(path))
    assert data.num_users == 300 and len(data.items) == sum(len(line.split()) - 1 for line in lines)
    # S3-Rec numbers items by first appearance, as build_sequences does: raw id k is item index k
    assert list(data.item_ids[1:]) == [str(k) for k in range(1, data.num_items + 1)]


@pytest.mark.real_data
def test_taobao_slice(tmp_path):
    with gzip.open(need(TAOBAO), "rt") as handle:
        head = [next(handle) for _ in range(3000)]
    path = write(tmp_path / "taobao_head.csv.gz", "".join(head))
    assert detect_format(path) == "events"
    data = build_sequences(load_interactions(path))
    assert set(data.behavior_names) <= {"pv", "cart", "fav", "buy"} and data.behavior_names[0] == "pv"
    assert data.user_ids[0] == "1" and data.item_ids[1] == "2268318"  # first line: 1,2268318,2520377,pv,...
    assert len(data.items) == 3000  # no exact duplicates, every user of the slice has >= 3 events


@pytest.mark.real_data
def test_full_beauty_matches_published_counts():
    started = time.perf_counter()
    data = build_sequences(load_interactions(need(BEAUTY)), attributes_path=str(need(BEAUTY_ATTRIBUTES)))
    assert time.perf_counter() - started < 5.0  # about 0.2 s here; the bound only catches a per-event loop
    assert (data.num_users, data.num_items, len(data.items)) == (22363, 12101, 198502)
    assert data.num_attributes == 637 and data.item_attributes.shape == (12102, 6)
    assert (data.item_attributes[1:] > 0).any(axis=1).all()  # every Beauty item has attributes


@pytest.mark.real_data
def test_full_taobao_prefix_matches_provenance():
    data = build_sequences(load_interactions(need(TAOBAO)))
    assert (data.num_users, data.num_items, len(data.items)) == (814, 55233, 84287)
    assert data.behavior_names == ("pv", "cart", "fav", "buy")
    assert np.bincount(data.behaviors)[1:].tolist() == [75693, 4494, 2351, 1749]
