"""bench/bench_capture.py in its smoke mode: every section runs on tiny-random, and what it reports about identity
holds (the trace's logits and the traced EnCodec stacks' audio are the eager ones, bit for bit). Its timings are
for docs/BENCHMARKS.md, not for a test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_capture_smoke_runs_and_reports_identical_numbers(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_capture", BENCH / "bench_capture.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    report = module.main(["--smoke"])
    out = capsys.readouterr().out
    step = report["step"]
    assert set(step["ms"]) == {"eager", "trace", "quality"} and step["rows"] == 4 and step["max_diff"] == {"trace": 0.0}
    assert all(ms > 0 for ms in step["ms"].values()) and step["make_s"]["trace"] > 0
    assert set(report["two_lanes"]) == {"eager", "trace"}
    assert all(row["alone_ms"] > 0 and row["two_threads_ms"] > 0 for row in report["two_lanes"].values())
    codec = report["codec"]
    assert codec["identical"] and codec["reason"] is None and codec["traces"] >= 2
    for text in ("one batched step", "two lanes in two threads", "EnCodec", "logits identical", "audio identical",
                 "every stream with a quality control"):
        assert text in out
