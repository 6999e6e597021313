"""What the musicgen-mini trainers share: resumable checkpoints (safetensors + JSON, no pickles), a
time- or step-bounded loop with progress, and the training log.

A checkpoint folder holds `weights.safetensors` (the model's state dict and the optimizer's tensors)
and `state.json` (step, seconds trained, settings, the optimizer's scalars, the log). Training resumes
from it bit for bit except for the data order, which is re-seeded from (seed, step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "train_for"]


class Checkpoint(dict):
    """The JSON side of a checkpoint: step, seconds, settings, log and anything a trainer adds."""


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    # Write beside, then rename: a run killed mid-save keeps the previous checkpoint.
    save_file(tensors, str(folder / "weights.tmp.safetensors"))
    (folder / "state.tmp.json").write_text(json.dumps({**meta, "optimizer": opt_meta}, indent=1))
    (folder / "weights.tmp.safetensors").replace(folder / "weights.safetensors")
    (folder / "state.tmp.json").replace(folder / "state.json")


def load_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> Checkpoint | None:
    """Restore `model` (and `opt`) from `folder`; None when there is no checkpoint yet."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "weights.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_meta = meta.pop("optimizer")
    if opt is not None:
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in opt_meta["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    return Checkpoint(meta)


def train_for(step_fn: Callable[[int], dict], *, start_step: int, start_seconds: float, minutes: float | None,
              steps: int | None, every: tuple[float, Callable[[int, float], None]], progress: bool = True,
              desc: str = "train") -> tuple[int, float]:
    """Call `step_fn(step)` until `minutes` of training time (this run) or `steps` (total) are done.

    `every = (minutes, callback)`: callback(step, seconds_trained) runs at that interval and at the end
    (checkpointing, evaluation); its own time is not counted as training time. Returns (step, seconds).
    """
    from tqdm import tqdm

    if minutes is None and steps is None:
        raise ValueError("give a time budget (minutes) or a step count")
    interval, callback = every
    step, trained = start_step, start_seconds
    run_started = trained
    next_call = trained + interval * 60
    bar = tqdm(disable=not progress, desc=desc, initial=step, total=steps, unit="step")
    while (steps is None or step < steps) and (minutes is None or trained - run_started < minutes * 60):
        began = time.perf_counter()
        record = step_fn(step)
        trained += time.perf_counter() - began
        step += 1
        bar.update(1)
        bar.set_postfix({k: v for k, v in record.items() if isinstance(v, (int, float))}, refresh=False)
        if trained >= next_call:
            callback(step, trained)
            next_call = trained + interval * 60
    bar.close()
    callback(step, trained)
    return step, trained
