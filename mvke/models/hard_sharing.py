"""Hard parameter sharing (Caruana 1997; paper section 5.1 baseline [4]).

A shared bottom MLP over the field embeddings (`tower_hidden`, its last entry the
bottom's output), then one head per task (`head_hidden` -> out_dim).
"""
from __future__ import annotations

from torch import nn

from mvke.models.layers import MixedUserTagger, ModelConfig, mlp


class HardSharing(MixedUserTagger):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        *hidden, width = cfg.tower_hidden
        self.bottom = mlp(self.flat_dim, hidden, width, cfg.activation, cfg.dropout)
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(mlp(width, cfg.head_hidden, cfg.out_dim, cfg.activation, cfg.dropout)
                                   for _ in self.tasks)

    def task_embeddings(self, flat):
        shared = self.act(self.bottom(flat))                             # [B, width]
        return [head(shared) for head in self.heads]                     # per task [B, D]
