"""Live server benchmarks, measured the way a client sees them (a real server process, real sockets).

1. Knob-to-audio latency: the time from sending a `set` to receiving the first audio sample that the
   change could have affected (step s's first sample, s * hop, where s is the step the `state` echo says
   the change applied at). This is the generation-side latency; a listener hears it `--lead` later, which
   is printed beside it.
2. Sessions at real time: N sessions each with a listener, for `--seconds`; per session the audio
   received per wall-clock second and the underruns the server counted. A session holds real time when
   it receives >= 0.97 s of audio per second and its underruns do not grow after the start.

    python bench/bench_latency.py --model tiny-random --knobs 60 --sessions 1,2,4
    python bench/bench_latency.py --model musicgen-mini --knobs 0 --sessions 1,2,4 --baseline /path/to/old-checkout

`--baseline DIR` runs the sessions part against a second server too, made from another checkout of musicrfm
(DIR holds the `musicrfm` package, put first on PYTHONPATH): the two alternate per session count, side by side
in one run (e.g. the server before the batched engine against this one).
    python bench/bench_latency.py --model random-small --device cuda --knobs 200 --sessions 1,2,4,8,16

Random weights make noise, not music; they have the real architecture and cost, which is what is timed.
`--model musicgen-mini` (the bundled, trained model) times the model the server runs by default. Either way
the knobs steer along random directions: the bench needs keys, not trained probes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from musicrfm.protocol.connection import AudioFrame, Connection


def make_bank(model_name: str, path: Path) -> None:
    """Random unit directions notes:C / notes:G for the model (the bench needs keys, not trained probes)."""
    import torch

    from musicrfm.engine.bank import DirectionBank
    from musicrfm.engine.model import load_model

    fp = load_model(model_name, device="cpu").fingerprint
    g = torch.Generator().manual_seed(0)
    DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                              torch.rand(2, fp.num_layers, generator=g), fp, method="random", pooling="mean").save(path)


def start_server(args, bank: Path, record_dir: Path, pythonpath: str | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "musicrfm", "serve", "--model", args.model, "--bank", str(bank), "--port", "0",
           "--osc-port", "-1", "--record-dir", str(record_dir), "--lead", str(args.lead),
           "--chunk-steps", str(args.chunk_steps), "--max-sessions", "64"]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        # A subpackage missing there (a dangling link) would be found in this checkout instead, silently: the
        # "baseline" would then be this code. Refuse that.
        where = subprocess.run([sys.executable, "-c", "import musicrfm.engine, musicrfm.server; "
                                "print(musicrfm.engine.__file__); print(musicrfm.server.__file__)"],
                               env=env, capture_output=True, text=True)
        found = where.stdout.split()
        root = os.path.abspath(pythonpath) + os.sep
        if where.returncode or len(found) != 2 or not all(f.startswith(root) for f in found):
            raise RuntimeError(f"--baseline {pythonpath}: its musicrfm.engine / .server are not its own "
                               f"(imported from {found or where.stderr.strip()[-300:]})")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == "ready":
            break
    m = re.search(r"page: http://([\d.]+):(\d+)/", "".join(seen))
    if m is None:
        raise RuntimeError("the server did not start:\n" + "".join(seen))
    return proc, f"{m.group(1)}:{m.group(2)}"


async def knob_latency(address: str, knobs: int, seed: int) -> dict:
    rng = random.Random(seed)
    async with await Connection.open(address, session="latency", max_size=None) as conn:
        hop = int(conn.hello["hop"])
        await conn.send({"type": "transport", "command": "play"})
        received = 0  # one past the last sample received
        waiting: dict[str, float] = {}  # id -> send time, until its state arrives
        targets: list[tuple[str, float, int]] = []  # (id, send time, first affected sample)
        latencies, lead = [], []
        warmup = time.perf_counter() + 2.0

        async def reader():
            nonlocal received
            async for message in conn:
                now = time.perf_counter()
                if isinstance(message, AudioFrame):
                    received = message.header.first_sample + message.header.num_samples
                    for item in [t for t in targets if received > t[2]]:
                        targets.remove(item)
                        latencies.append(now - item[1])
                    continue
                if message["type"] == "state" and message.get("cause") and message["cause"].get("id") in waiting:
                    sent = waiting.pop(message["cause"]["id"])
                    targets.append((message["cause"]["id"], sent, message["step"] * hop))
                elif message["type"] == "stats":
                    lead.append(message["lead_seconds"])

        task = asyncio.create_task(reader())
        while time.perf_counter() < warmup:
            await asyncio.sleep(0.05)
        for i in range(knobs):
            key = f"k{i}"
            waiting[key] = time.perf_counter()
            await conn.send({"type": "set", "id": key,
                             "directions": {"notes:C": {"coefficient": rng.uniform(0, 2)}}})
            await asyncio.sleep(rng.uniform(0.1, 0.3))  # a hand on a knob, a few changes a second
        deadline = time.perf_counter() + 5
        while (waiting or targets) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
    latencies.sort()
    return {"n": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[max(0, round(0.95 * len(latencies)) - 1)],
            "max_ms": 1000 * latencies[-1], "lead_s": statistics.median(lead) if lead else float("nan")}


async def concurrent_sessions(address: str, n: int, seconds: float) -> list[dict]:
    async def one(i: int) -> dict:
        async with await Connection.open(address, session=f"load{n}-{i}", max_size=None) as conn:
            await conn.send({"type": "transport", "command": "play"})
            samples, start, first_underruns, underruns, rate = 0, None, None, 0, 32000
            end = time.perf_counter() + seconds + 1.0
            async for message in conn:
                now = time.perf_counter()
                if isinstance(message, AudioFrame):
                    header = message.header
                    rate = header.sample_rate
                    if start is None and now > end - seconds:  # one second of warm-up first
                        start, samples = now, 0
                    elif start is not None:
                        samples += header.num_samples
                elif message["type"] == "stats":
                    underruns = message["underruns"]
                    if start is not None and first_underruns is None:
                        first_underruns = underruns
                if now > end:
                    break
            await conn.send({"type": "transport", "command": "stop"})
        elapsed = time.perf_counter() - start
        return {"audio_per_second": samples / rate / elapsed,
                "new_underruns": underruns - (first_underruns if first_underruns is not None else 0)}

    return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default=None)
    ap.add_argument("--knobs", type=int, default=60, help="knob changes to time (0: skip)")
    ap.add_argument("--sessions", default="1,2,4", help="concurrent session counts to try ('' : skip)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per concurrency level")
    ap.add_argument("--lead", type=float, default=0.5)
    ap.add_argument("--chunk-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=None, help="a folder holding another musicrfm package: its server too, "
                                                      "side by side")
    args = ap.parse_args()

    import torch

    print(f"# bench_latency  {time.strftime('%Y-%m-%dT%H:%M:%S')}  {platform.node()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, cpus {os.cpu_count()}, "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    from musicrfm.engine.model import NOISE_LABEL, is_random_model

    kind = f"{NOISE_LABEL}, timed for its cost" if is_random_model(args.model) else "trained weights"
    print(f"model {args.model} ({kind}), lead {args.lead} s, chunk {args.chunk_steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "bank.safetensors"
        make_bank(args.model, bank)
        proc, address = start_server(args, bank, Path(tmp) / "rec")
        procs = [proc]
        try:
            if args.knobs:
                r = asyncio.run(knob_latency(address, args.knobs, args.seed))
                print(f"\nknob -> first affected sample generated: n {r['n']}, p50 {r['p50_ms']:.0f} ms, "
                      f"p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms; heard about lead "
                      f"{r['lead_s']:.2f} s later")
                print(json.dumps({"knob_latency": r}))
            if args.sessions:
                servers = {"this": address}
                if args.baseline:
                    base_proc, servers["baseline"] = start_server(args, bank, Path(tmp) / "rec-base", args.baseline)
                    procs.append(base_proc)
                print(f"\n| sessions | server | audio s per s (min / mean) | new underruns (max) | all at real time |")
                print("|---|---|---|---|---|")
                for n in [int(x) for x in args.sessions.split(",")]:
                    per_server = {}
                    for name in sorted(servers, reverse=True):  # baseline first, then this one
                        rows = asyncio.run(concurrent_sessions(servers[name], n, args.seconds))
                        rates = [r["audio_per_second"] for r in rows]
                        worst = max(r["new_underruns"] for r in rows)
                        ok = min(rates) >= 0.97 and worst == 0
                        per_server[name] = statistics.mean(rates)
                        print(f"| {n} | {name} | {min(rates):.2f} / {statistics.mean(rates):.2f} | {worst} | "
                              f"{'yes' if ok else 'no'} |", flush=True)
                    if len(per_server) == 2:
                        print(f"| {n} | this / baseline | {per_server['this'] / per_server['baseline']:.2f}x | | |",
                              flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
