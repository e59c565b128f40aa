"""MVKE-st: MVKE on a single tagging task (paper section 5.1 ablation), one model per task.

Each task gets its own MVKE with as many virtual-kernel experts as that task
uses in MVKE-mt (default 3 for interest, 4 for intention), all serving it.
"""
from __future__ import annotations

from mvke.models.layers import ModelConfig, PerTaskModel
from mvke.models.mvke import MVKE, validate_task_experts


class MVKESingleTask(PerTaskModel):
    def __init__(self, cfg: ModelConfig):
        validate_task_experts(cfg)  # the same assignment (and errors) as mvke-mt
        super().__init__(cfg, _single_task_mvke)


def _single_task_mvke(cfg: ModelConfig) -> MVKE:
    (task,) = cfg.tasks
    n = len(cfg.task_experts[task])
    return MVKE(ModelConfig(**{**cfg.__dict__, "experts": n, "task_experts": {task: list(range(n))}}))
