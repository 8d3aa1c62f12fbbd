"""`seqrank bench retraining`'s day split on a hand-built Taobao-layout file: days start at 00:00 UTC+8, stray
events before the first full day join it, items with too few events in the whole log are dropped first."""

from __future__ import annotations

import json

import pandas as pd

from seqrank.serving.bench.retraining import format_table, split_days
from seqrank.training.bootstrap import Interval

BEIJING_MIDNIGHT_1125 = 1511539200  # 2017-11-25 00:00 UTC+8 = 2017-11-24 16:00 UTC


def test_split_days_by_hand(tmp_path):
    rows = [("u1", "a", "c1", "pv", BEIJING_MIDNIGHT_1125 - 5 * 86400)]  # a stray event days before: day 0
    rows += [(f"u{n}", "a", "c1", "pv", BEIJING_MIDNIGHT_1125 + 60 * n) for n in range(10)]  # 11-25
    rows += [(f"u{n}", "b", "c2", "pv", BEIJING_MIDNIGHT_1125 + 86400 - 1) for n in range(10)]  # 11-25 23:59:59
    rows += [(f"u{n}", "c", "c2", "buy", BEIJING_MIDNIGHT_1125 + 86400) for n in range(10)]  # 11-26 00:00
    rows += [("u1", "rare", "c3", "pv", BEIJING_MIDNIGHT_1125 + 86400 + 5)]  # one event: dropped at min 2
    path = tmp_path / "log.csv"
    pd.DataFrame(rows).to_csv(path, header=False, index=False)
    names, frame, attributes = split_days(path, tmp_path, utc_offset_h=8, min_item_events=2)
    assert names == ["2017-11-25", "2017-11-26"]
    assert "rare" not in set(frame["item_id"])
    by_item = frame.groupby("item_id")["day"].agg(set).to_dict()
    assert by_item == {"a": {0}, "b": {0}, "c": {1}}
    assert json.loads(attributes.read_text()) == {"a": ["c1"], "b": ["c2"], "c": ["c2"]}


def test_the_table_states_both_ratios():
    from seqrank.serving.bench.retraining import DayResult

    result = DayResult("2017-12-03", 385, 40.0, 4.0, 1000, 100, Interval(0.02, 0.01, 0.03),
                       Interval(0.019, 0.01, 0.03), Interval(-0.001, -0.005, 0.003))
    row = format_table([result]).splitlines()[-1]
    assert "| 10 % |" in row and "| 95 % |" in row
