"""bench/bench_gpu.py in its smoke mode (what CI runs): every section runs on tiny-random on the CPU and reports
numbers that hang together. The figures themselves are for a GPU (docs/BENCHMARKS.md); here it must only run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_gpu():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "bench_gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_bench_gpu_smoke_runs_every_section(capsys):
    report = _bench_gpu().main(["--smoke"])
    out = capsys.readouterr().out
    tiny = report["models"]["tiny-random"]
    assert tiny["device"] == "cpu" and tiny["graphs"] is True  # the trace, timed against eager in section 1
    assert tiny["eager_steps_per_s"] > 0 and "trace" in out
    assert tiny["own_steps_per_s"] > 0 and tiny["generate_steps_per_s"] > 0
    assert tiny["own_over_generate"] == tiny["own_steps_per_s"] / tiny["generate_steps_per_s"]
    assert set(tiny["steering_overhead_pct"]) == {"1", "4"}
    rows = tiny["realtime"]
    assert [r["streams"] for r in rows] == [2**i for i in range(len(rows))] and rows[0]["ms_per_step"] > 0
    assert tiny["streams_at_realtime"] == max([r["streams"] for r in rows if r["x_realtime"] >= 1], default=0)
    assert 0 < tiny["knob_latency_ms"]["p50"] <= tiny["knob_latency_ms"]["p95"]
    for text in ("own loop", "transformers generate", "steering overhead", "streams at real time", "knob latency"):
        assert text in out
