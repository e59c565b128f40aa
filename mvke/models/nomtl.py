"""noMTL: the basic two-tower solution of paper section 3.2 (Fig. 3), one model per task.

Each task gets its own user tower (an MLP over the concatenated field
embeddings) and its own tag tower; nothing is shared between tasks.
"""
from __future__ import annotations

from mvke.models.layers import MixedUserTagger, ModelConfig, PerTaskModel, mlp


class SingleTaskTwoTower(MixedUserTagger):
    """Two-tower for one task: E_u = MLP(concat field embeddings), hidden sizes `tower_hidden`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tower = mlp(self.flat_dim, cfg.tower_hidden, cfg.out_dim, cfg.activation, cfg.dropout)

    def task_embeddings(self, flat):
        return [self.tower(flat)]                                        # [B, D]


class NoMTL(PerTaskModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, SingleTaskTwoTower)
