"""Hard parameter sharing (Caruana 1997; paper section 5.1 baseline [4]).

A shared bottom MLP over the field embeddings, then one head per task.
"""
from __future__ import annotations

from torch import nn

from mvke.models.layers import MixedUserTagger, ModelConfig, mlp


class HardSharing(MixedUserTagger):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bottom = mlp(self.flat_dim, [256], 128, cfg.activation, cfg.dropout)
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(mlp(128, [64], cfg.out_dim, cfg.activation) for _ in self.tasks)

    def task_embeddings(self, flat):
        shared = self.act(self.bottom(flat))                             # [B, 128]
        return [head(shared) for head in self.heads]                     # per task [B, D]
