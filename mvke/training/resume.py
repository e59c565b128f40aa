"""A single-process training run that outlives its machine: its whole state on disk, so that a stopped
run continues where it stopped and ends as the same run (the same weights, bit for bit, as one without a
stop, when both run the same CPU kernels: tests/training/test_resume.py; continued on a machine whose
PyTorch picks other kernels, e.g. AVX2 instead of AVX-512, it goes on deterministically from the same
state, with last-bit differences from there on).

Why: a learning-curve run at 1.28M users (issue 27) takes hours of CPU, longer than the machine it
starts on is lent; cells only hold finished runs. The state is saved at the end of every epoch and every
`every_s` seconds inside one (then the epoch restarts from the same permutation and skips the batches
already trained on). What is saved: weights, optimiser and schedule, numpy's shuffling generator as it
was when the epoch drew its permutation, torch's generator, early stopping (best weights, history),
counters, CPU and wall seconds so far, and a key naming the configuration, seed and data, so that a
state is never continued on another run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mvke.runtime.system import cpu_model


def progress(state: dict) -> tuple[int, int]:
    """(epochs done, steps into the next) of a saved state."""
    partial = state["partial"] or {}
    return state["epoch"] - (1 if partial else 0), partial.get("steps", 0)


@dataclass
class PartialEpoch:
    """Running totals of an epoch in progress (the trainer's `train_epoch` continues from them)."""
    loss_total: float = 0.0   # sum over samples of the batch loss x batch size
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0


class RunCheckpoint:
    """The state file of one run (`path`), identified by `key`.

    Use: `restore(...)` once before the loop (returns the epoch to start and the partial epoch, if
    any); `epoch_batches(epoch)` as the loop's batch source; `after_step` and `after_epoch` from the
    loop. The caller removes the file once the run's result is written (experiment._run_seed)."""

    def __init__(self, path: str | Path, key: str, every_s: float = 600.0):
        self.path, self.key, self.every_s = Path(path), key, every_s
        self._last_save = time.monotonic()
        self._epoch_rng: dict | None = None      # numpy's generator state before the epoch's permutation
        self._objects: dict = {}
        self.cpu_before = self.wall_before = 0.0  # of the processes before this one
        self.cpus = [cpu_model()]                # the CPU model of each process that trained the run
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    # -- wiring ---------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, opt, sched, rng: np.random.Generator, make_batches: Callable,
             stopping, run) -> None:
        """The objects whose state is the run's state (`stopping`: trainer.EarlyStopping, `run`: trainer.FitResult);
        make_batches(skip) -> one epoch's batches drawn from `rng`, the first `skip` left out."""
        self._objects = dict(model=model, opt=opt, sched=sched, rng=rng, make_batches=make_batches,
                             stopping=stopping, run=run)
        self._skip = 0

    def restore(self) -> tuple[int, PartialEpoch | None]:
        """Load the saved state into the bound objects: (first epoch to train, its partial totals or None)."""
        if not self.path.exists():
            return 1, None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state["key"] != self.key:
            raise RuntimeError(f"{self.path}: saved for another run ({state['key']!r}, this one is {self.key!r}); "
                               f"remove it (and the copy the learning curve keeps under docs/results/learning_curve/"
                               f"inflight/) to start this run afresh")
        o = self._objects
        o["model"].load_state_dict(state["model"])
        o["opt"].load_state_dict(state["opt"])
        if o["sched"] is not None:
            o["sched"].load_state_dict(state["sched"])
        o["rng"].bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for k, v in state["stopping"].items():
            setattr(o["stopping"], k, v)
        for k, v in state["run"].items():
            setattr(o["run"], k, v)
        self.cpu_before, self.wall_before = state["cpu_seconds"], state["wall_seconds"]
        earlier = state.get("cpus") or ["not recorded"]    # states saved before the field existed
        self.cpus = earlier + [c for c in self.cpus if c != earlier[-1]]
        partial = PartialEpoch(**state["partial"]) if state["partial"] else None
        self._skip = partial.steps if partial else 0
        return state["epoch"] + (0 if partial else 1), partial

    def epoch_batches(self, epoch: int):
        """The epoch's batches, minus those a restored partial epoch already trained on."""
        self._epoch_rng = self._objects["rng"].bit_generator.state
        skip, self._skip = self._skip, 0
        return self._objects["make_batches"](skip)

    # -- saving ---------------------------------------------------------------------------------
    def after_step(self, epoch: int, partial: PartialEpoch) -> None:
        if time.monotonic() - self._last_save >= self.every_s:
            self._save(epoch, partial)

    def after_epoch(self, epoch: int) -> None:
        self._save(epoch, None)

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self._cpu0

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self._wall0

    def _save(self, epoch: int, partial: PartialEpoch | None) -> None:
        o = self._objects
        stopping, run = o["stopping"], o["run"]
        state = {
            "key": self.key, "epoch": epoch, "partial": vars(partial).copy() if partial else None,
            # inside an epoch: the generator before its permutation (drawn again on restore)
            "rng": self._epoch_rng if partial else o["rng"].bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "model": o["model"].state_dict(), "opt": o["opt"].state_dict(),
            "sched": o["sched"].state_dict() if o["sched"] is not None else None,
            "stopping": {k: getattr(stopping, k) for k in ("best", "best_epoch", "best_state", "history")},
            "run": {k: getattr(run, k) for k in ("samples", "steps", "step_seconds")},
            "cpu_seconds": self.cpu_seconds(), "wall_seconds": self.wall_seconds(), "cpus": self.cpus,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())   # on disk before the rename: a machine stopped hard keeps a whole state
        tmp.replace(self.path)     # a reader (or a kill) sees the old state or the new one, never half of one
        self._last_save = time.monotonic()
