"""MMoE: a pool of experts and one softmax gate per task (Ma et al., KDD 2018; paper baseline [24])."""
from __future__ import annotations

from torch import nn

from mvke.models.layers import MixedUserTagger, ModelConfig, expert_pool, gated_mixture, mlp


class MMoE(MixedUserTagger):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.experts = expert_pool(cfg, self.flat_dim)
        self.gates = nn.ModuleList(nn.Linear(self.flat_dim, cfg.experts) for _ in self.tasks)
        self.heads = nn.ModuleList(mlp(cfg.out_dim, [], cfg.out_dim) for _ in self.tasks)

    def task_embeddings(self, flat):
        experts = self.experts(flat.unsqueeze(0).expand(self.cfg.experts, -1, -1)).transpose(0, 1)  # [B, E, D]
        return [head(gated_mixture(experts, gate(flat))) for gate, head in zip(self.gates, self.heads)]
