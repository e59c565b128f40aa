"""CGC: the single-level PLE (Tang et al., RecSys 2020; paper baseline [31]).

Shared and task-specific experts; each task's gate mixes its own experts and the
shared ones. The split follows `task_experts`, the same assignment MVKE uses
(default: experts 2-3 shared, 1 interest-only, 4-5 intention-only), so the two
differ only in how experts are built and gated.
"""
from __future__ import annotations

import torch
from torch import nn

from mvke.models.layers import MixedUserTagger, ModelConfig, expert_pool, gated_mixture, mlp
from mvke.models.mvke import validate_task_experts


class CGC(MixedUserTagger):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        validate_task_experts(cfg)
        self.experts = expert_pool(cfg, self.flat_dim)
        self.gates = nn.ModuleList(nn.Linear(self.flat_dim, len(cfg.task_experts[t])) for t in self.tasks)
        self.heads = nn.ModuleList(mlp(cfg.out_dim, [], cfg.out_dim) for _ in self.tasks)
        for i, t in enumerate(self.tasks):
            self.register_buffer(f"experts_{i}", torch.tensor(cfg.task_experts[t]), persistent=False)

    def task_embeddings(self, flat):
        experts = self.experts(flat.unsqueeze(0).expand(self.cfg.experts, -1, -1)).transpose(0, 1)  # [B, E, D]
        out = []
        for i, (gate, head) in enumerate(zip(self.gates, self.heads)):
            mine = experts[:, getattr(self, f"experts_{i}")]               # [B, E_t, D]
            out.append(head(gated_mixture(mine, gate(flat))))
        return out
