"""`seqrank bench train` and `seqrank bench encoder` on tiny settings: tables, JSON and the numbers behind them."""

import json

import numpy as np
import pytest

from seqrank.serving.bench.train_speed import ENCODER_PRESETS, encoder_flops_per_sequence, training_workload
from seqrank.serving.cli import main
from seqrank.training.config import load_config
from seqrank.training.model import EncoderConfig
from seqrank.training.sources import load_sequences

TINY_TRAIN = ["data.synthetic_users=300", "data.synthetic_items=100", "model.hidden_size=16",
              "model.intermediate_size=32", "optim.batch_size=64", "optim.num_threads=1"]


def test_flops_per_sequence_match_the_hand_count():
    default = EncoderConfig(num_items=10, **ENCODER_PRESETS["default"])
    # 2 layers x 50 positions x (8*64^2 projections + 4*64*256 MLP + 4*50*64 attention)
    assert encoder_flops_per_sequence(default, 50) == 2 * 50 * (8 * 64**2 + 4 * 64 * 256 + 4 * 50 * 64)
    large = EncoderConfig(num_items=10, **ENCODER_PRESETS["large"])
    assert encoder_flops_per_sequence(large, 200) == pytest.approx(10.7217e9, rel=1e-4)
    llama = EncoderConfig(num_items=10, backbone="llama", **ENCODER_PRESETS["default"])
    assert encoder_flops_per_sequence(llama, 50) - encoder_flops_per_sequence(default, 50) == 2 * 50 * 2 * 64 * 256


def test_bench_train_reports_epoch_time_and_throughput_for_synthetic_and_a_file(tmp_path, capsys, synthetic_dataset):
    events, _ = synthetic_dataset
    out = tmp_path / "train.json"
    args = ["bench", "train", "--epochs", "2", "--data", str(events), "--json", str(out)]
    assert main(args + [a for o in TINY_TRAIN for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["data"] for r in rows] == ["synthetic", "events.csv"]
    assert "synthetic" in printed and "events.csv" in printed and "seq/s" in printed
    synthetic = load_sequences(load_config(None, TINY_TRAIN).data)
    sequences, positions = training_workload(synthetic, 50)
    first = rows[0]
    assert (first["users"], first["sequences"], first["positions"], first["epochs"]) == (300, sequences, positions, 2)
    assert first["sequences_per_s"] == pytest.approx(sequences / first["train_s_per_epoch"])
    assert 0 < first["train_s_per_epoch"] <= first["epoch_s"]  # the epoch adds validation to the training pass
    assert rows[1]["users"] == 800 and rows[1]["items"] == 200


def test_bench_encoder_times_each_cell_and_skips_what_exceeds_the_budget(tmp_path, capsys):
    out = tmp_path / "encoder.json"
    args = ["bench", "encoder", "--models", "default", "--devices", "cpu", "--dtypes", "fp32", "--batch-sizes", "1",
            "4", "--seconds", "0.05", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["skipped"]) for r in rows] == [(1, ""), (4, "")]
    for r in rows:
        assert r["sequences_per_s"] == pytest.approx(r["batch_size"] / (r["latency_ms"] / 1e3))
        assert r["gflop_per_sequence"] == pytest.approx(0.0111104)
    assert "ms/batch" in capsys.readouterr().out

    assert main(args[:-2] + ["--max-call-seconds", "0", "--json", str(out)]) == 0  # nothing fits a zero budget
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["skipped"] == "" and rows[1]["skipped"].startswith("est.") and rows[1]["latency_ms"] is None
    assert np.isfinite(rows[0]["latency_ms"])


def test_bench_encoder_bf16_weights_share_the_bf16_matmul_peak(tmp_path):
    out = tmp_path / "encoder.json"
    assert main(["bench", "encoder", "--models", "default", "--devices", "cpu", "--dtypes", "bf16", "bf16w",
                 "--batch-sizes", "2", "--seconds", "0.05", "--threads", "1", "--matmul-peak", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [p["dtype"] for p in report["matmul_peak_tflops"]] == ["bf16"]  # one bf16 measurement serves both
    rows = {r["dtype"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "bf16w"} and all(r["compile_mode"] == "" for r in rows.values())
    peak = report["matmul_peak_tflops"][0]["tflops"]
    for r in rows.values():
        assert r["percent_of_matmul_peak"] == pytest.approx(100 * r["achieved_tflops"] / peak)
