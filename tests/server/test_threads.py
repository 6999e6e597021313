"""`serve --threads`: on CPU the model leaves the event loop a core of its own unless told otherwise; `serve
--capture`: the lanes replay a captured step on a CPU by default, eagerly when asked."""

import os

import pytest

from musicrfm.server.cli import captures, compute_threads


def test_cpu_serving_leaves_the_event_loop_a_core():
    cores = os.cpu_count() or 1
    assert compute_threads(None, "cpu") == max(1, cores - 1)
    assert compute_threads(3, "cpu") == 3 and compute_threads(2, "cuda") == 2
    assert compute_threads(None, "cuda") is None  # a GPU does the model's work: torch's default
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        compute_threads(0, "cpu")


def test_capture_is_on_by_default_on_a_cpu_only():
    assert captures("auto", "cpu") and not captures("auto", "cuda")  # CUDA graphs: not measured on a GPU yet
    assert captures("on", "cuda") and captures("on", "cpu") and not captures("off", "cpu")
    with pytest.raises(ValueError, match="capture must be one of auto, on, off, got 'yes'"):
        captures("yes", "cpu")


def test_the_server_runs_the_model_on_the_threads_it_says(test_bank_path, tmp_path):
    from live_server import start_server, stop_server

    server = start_server(test_bank_path, tmp_path, "--threads", "1")
    try:
        assert any(line.startswith("torch threads: 1 ") for line in server.output), server.output
        assert "steps: captured, a TorchScript trace per batch size (--capture)" in server.output, server.output
    finally:
        stop_server(server)
