"""MoE: one gate shared by all tasks over a pool of experts (Jacobs et al. 1991; paper baseline [16])."""
from __future__ import annotations

from torch import nn

from mvke.models.layers import MixedUserTagger, ModelConfig, expert_pool, gated_mixture, mlp


class MoE(MixedUserTagger):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.experts = expert_pool(cfg, self.flat_dim)
        self.gate = nn.Linear(self.flat_dim, cfg.experts)
        self.heads = nn.ModuleList(mlp(cfg.out_dim, [], cfg.out_dim) for _ in self.tasks)

    def task_embeddings(self, flat):
        experts = self.experts(flat.unsqueeze(0).expand(self.cfg.experts, -1, -1)).transpose(0, 1)  # [B, E, D]
        mixed = gated_mixture(experts, self.gate(flat))                  # [B, D]
        return [head(mixed) for head in self.heads]
