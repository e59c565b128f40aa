"""MVKE: Mixture of Virtual-Kernel Experts (Xu et al., KDD 2022), sections 4.1-4.2.

* Virtual-Kernel Expert k (eq. 4-6): a learnable kernel VK_k is the attention
  query over the user's field embeddings, softmax over fields, then an
  expert tower f_u^k gives E_u^k.
* Virtual-Kernel Gate, one per task (eq. 7): the task's tag embedding is the
  query, the task's kernels the keys, the expert outputs the values.
* Multi-task (eq. 8-9): each task's gate sees a subset of the experts; the loss
  is the sum of the task losses.

Choices the paper leaves open (docs/MODELS.md has the measurements):

* attention="values" (default): field f has a value map P_f shared by the experts
  and expert k's first hidden layer is sum_f F * w_kf * P_f(e_f) + b_k, w_k its
  softmax attention over the F fields (eq. 5 with field-specific values and the
  expert's first layer folded in), then the rest of its tower (eq. 6). With
  uniform weights it is one shared linear layer, so experts can only read
  different fields through their kernels. Keys carry a learned vector per field
  (an expert can prefer fields whatever their values), Q and K are linear (as in
  the published code) and the kernels start at N(0, 1) (`kernel_init`).
* attention="residual" is the published code's form (weighted values plus the
  raw field embedding, LayerNorm'ed, each expert's tower reading all F*d
  numbers): the LayerNorm'ed sum barely depends on the weights, and with kernels
  N(0, 0.01) and ReLU'd projections the attention stays uniform (normalised
  entropy 1.000); "fields" scales each field by F * w_kf before per-expert towers
  (non-uniform only as far as the initialisation makes it: a per-expert first
  layer can undo any weighting, so training hardly moves it).
* gate="bilinear" (default): softmax over the task's kernels of E_T^T W VK, W a
  learned D x D map. This is ours, not the published code: the published
  vkg_layer is the plain product E_T . VK (gate="plain", its projection line is
  commented out there). gate="projected" is eq. 7 literally (sigma'd Q and K
  projections, 1/sqrt(d), with gate_value a value map V).
* Controls (registered as models): gate="uniform" (every gate weight 1/K_task)
  and attention="uniform" (every field weight 1/F: the kernels play no part in
  the experts).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mvke.models.layers import ACTIVATIONS, BatchedMLP, FieldEmbedding, ModelConfig, TagTower, TwoTowerTagger

ATTENTIONS = ("values", "fields", "residual", "uniform")
GATES = ("bilinear", "plain", "projected", "uniform")


def validate_task_experts(cfg: ModelConfig) -> None:
    if cfg.experts < 1:
        raise ValueError(f"experts must be >= 1, got {cfg.experts}")
    for task in cfg.tasks:
        if task not in cfg.task_experts:
            raise ValueError(f"task {task!r} has no expert assignment (task_experts keys: {sorted(cfg.task_experts)})")
        idx = cfg.task_experts[task]
        if len(idx) == 0:
            raise ValueError(f"task {task!r} is assigned no expert")
        bad = [i for i in idx if not 0 <= i < cfg.experts]
        if bad:
            raise ValueError(f"task {task!r}: expert index {bad[0]} out of range 0..{cfg.experts - 1}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"task {task!r}: expert indices repeat: {idx}")
    unused = set(range(cfg.experts)) - {i for t in cfg.tasks for i in cfg.task_experts[t]}
    if unused:
        raise ValueError(f"experts {sorted(unused)} serve no task")


class VirtualKernelExperts(nn.Module):
    """All K experts at once: kernel attention over the fields, then K expert towers (eq. 4-6).

    attention="values" (default): every field f has a value map P_f (d -> h, shared by the
    experts: "all the VKEs share the same feature input layer", section 4.1), and expert k's
    first hidden layer is sum_f F * w_kf * P_f(e_f) + b_k (eq. 5 with field-specific values),
    followed by the rest of its tower (eq. 6). Uniform weights make it one shared linear
    layer over the concatenated fields, so the experts can only read different fields through
    their kernels.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
        d, a, K, F = cfg.embed_dim, cfg.attn_dim, cfg.experts, cfg.num_fields
        self.mode, self.attn_dim, self.num_fields = cfg.attention, a, F
        # The kernels are also the gate's keys, so they live in the tag space (size out_dim).
        self.kernels = nn.Parameter(torch.randn(K, cfg.out_dim) * cfg.kernel_init)
        learned = self.mode != "uniform"
        if learned:
            self.q = nn.Linear(cfg.out_dim, a)
            self.act = ACTIVATIONS[cfg.attn_activation or cfg.activation]()
        if learned and self.mode != "residual":
            self.k = nn.Linear(d, a)
            self.field_keys = nn.Parameter(torch.randn(F, a))                # [F, a]: field identity in the keys
        if self.mode == "residual":
            self.kv = nn.Linear(d, a + d)   # K and V of all fields in one MatMul
            self.norm = nn.LayerNorm(d)
        hidden = list(cfg.expert_hidden)
        if self.mode in ("values", "uniform"):
            h = hidden[0] if hidden else cfg.out_dim
            self.values = nn.Parameter(torch.empty(F, d, h))                  # [F, d, h]: P_f
            nn.init.uniform_(self.values, -1 / math.sqrt(F * d), 1 / math.sqrt(F * d))
            self.value_bias = nn.Parameter(torch.zeros(K, 1, h))
            self.value_act = nn.Sequential(ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)) if hidden else nn.Identity()
            self.towers = BatchedMLP(K, h, hidden[1:], cfg.out_dim, cfg.activation, cfg.dropout) if hidden else None
        else:
            self.towers = BatchedMLP(K, F * d, hidden, cfg.out_dim, cfg.activation, cfg.dropout)

    def field_weights(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of each expert over the fields [B, F, K] (softmax over F) and the values (or None)."""
        B, F, _ = fields.shape
        K = self.kernels.shape[0]
        if self.mode == "uniform":
            return fields.new_full((B, F, K), 1.0 / F), None
        q = self.act(self.q(self.kernels))                              # [K, a]
        if self.mode == "residual":
            kv = self.act(self.kv(fields))                              # [B, F, a + d]
            k, v = kv[..., : self.attn_dim], kv[..., self.attn_dim:]    # [B, F, a], [B, F, d]
        else:
            k, v = self.act(self.k(fields) + self.field_keys), None     # [B, F, a]
        scores = torch.matmul(k, q.T) / math.sqrt(self.attn_dim)        # [B, F, K]
        return torch.softmax(scores, dim=1), v

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        B, F, d = fields.shape
        w, v = self.field_weights(fields)                               # [B, F, K], [B, F, d] | None
        if self.mode in ("values", "uniform"):
            # Plain (batched) MatMuls rather than einsum: ONNX Runtime runs them faster.
            per_field = torch.matmul(fields.transpose(0, 1), self.values).transpose(0, 1)  # [B, F, h]: P_f(e_f)
            mixed = torch.matmul((F * w).transpose(1, 2), per_field)                       # [B, K, h]
            x = self.value_act(mixed.transpose(0, 1) + self.value_bias)                    # [K, B, h]
            return (self.towers(x) if self.towers is not None else x).transpose(0, 1)  # [B, K, D]
        w_k = w.permute(2, 0, 1).unsqueeze(-1)                          # [K, B, F, 1]
        if self.mode == "residual":
            x = self.norm(w_k * v.unsqueeze(0) + fields.unsqueeze(0))   # [K, B, F, d]
        else:
            x = F * w_k * fields.unsqueeze(0)                           # [K, B, F, d]
        return self.towers(x.reshape(-1, B, F * d)).transpose(0, 1)     # [B, K, D]


class VirtualKernelGate(nn.Module):
    """The gate of one task (eq. 7): the tag embedding attends over the task's kernels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {cfg.gate!r}")
        self.mode, self.attn_dim = cfg.gate, cfg.attn_dim
        if self.mode == "projected":
            self.q = nn.Linear(cfg.out_dim, cfg.attn_dim)
            self.k = nn.Linear(cfg.out_dim, cfg.attn_dim)
            self.act = ACTIVATIONS[cfg.attn_activation or cfg.activation]()
        elif self.mode == "bilinear":
            self.proj = nn.Linear(cfg.out_dim, cfg.out_dim, bias=False)
        self.value = nn.Linear(cfg.out_dim, cfg.out_dim) if cfg.gate_value else nn.Identity()

    def weights(self, tag_emb: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """tag_emb [B, D], kernels [K_t, D] -> gate weights [B, K_t]."""
        if self.mode == "uniform":
            return tag_emb.new_full((tag_emb.shape[0], kernels.shape[0]), 1.0 / kernels.shape[0])
        if self.mode == "projected":
            q = self.act(self.q(tag_emb))                               # [B, a]
            k = self.act(self.k(kernels))                               # [K_t, a]
            return torch.softmax(q @ k.T / math.sqrt(self.attn_dim), -1)
        if self.mode == "bilinear":
            tag_emb = self.proj(tag_emb)                                # [B, D]
        return torch.softmax(tag_emb @ kernels.T, -1)                   # [B, K_t]


class MVKE(TwoTowerTagger):
    """MVKE on one or more tasks (`mvke-mt`; `mvke-st` wraps one per task).

    Args:
        cfg: ModelConfig; `experts` and `task_experts` set the expert assignment.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        validate_task_experts(cfg)
        self.embedding = FieldEmbedding(cfg.num_ids, cfg.embed_dim, cfg.field_norm)
        self.experts = VirtualKernelExperts(cfg)
        self.tag_tower = TagTower(cfg, self.tasks)
        self.gates = nn.ModuleList(VirtualKernelGate(cfg) for _ in self.tasks)
        for i, t in enumerate(self.tasks):
            self.register_buffer(f"experts_{i}", torch.tensor(cfg.task_experts[t], dtype=torch.long), persistent=False)

    def _task_experts(self, i: int) -> torch.Tensor:
        return getattr(self, f"experts_{i}")

    def experts_per_task(self) -> list[int]:
        return [len(self.cfg.task_experts[t]) for t in self.tasks]

    def expert_outputs(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor) -> torch.Tensor:
        return self.experts(self.embedding(cat_ids, multi_ids))         # [B, K, D]

    def user_vectors(self, cat_ids, multi_ids):
        e = self.expert_outputs(cat_ids, multi_ids)                     # [B, K, D]
        return [gate.value(e[:, self._task_experts(i)]) for i, gate in enumerate(self.gates)]  # [B, K_t, D]

    def tag_vectors(self, tag_ids):
        out = []
        for i, (e_t, gate) in enumerate(zip(self.tag_tower(tag_ids), self.gates)):
            kernels = self.experts.kernels[self._task_experts(i)]       # [K_t, D]
            out.append((e_t, gate.weights(e_t, kernels)))               # [B, D], [B, K_t]
        return out

    def field_attention(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor) -> torch.Tensor:
        """Attention of each expert over the fields [B, F, K] (for inspection)."""
        return self.experts.field_weights(self.embedding(cat_ids, multi_ids))[0]
