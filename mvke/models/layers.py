"""Small building blocks shared by every model in `mvke.models`.

All models are two-tower taggers with the same contract, which is also the
export/serving contract (paper section 4.3):

* user side, per task: value-transformed expert outputs `[B, K_task, D]`;
* tag side, per task: the tag embedding `[T, D]` and gate weights `[T, K_task]`;
* score: `sigmoid(scale * cos(sum_k a_tk V_k, E_t) + bias)`.

Baselines whose mixing depends on the user (MoE, MMoE, CGC, ...) mix inside the
user tower and expose `K_task = 1` with gate weight 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity,
               "leaky_relu": nn.LeakyReLU}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved next to its weights).

    Args:
        name: registry name (`mvke-mt`, `nomtl`, ...).
        tasks: task names, in label-column order.
        num_ids: size of the shared user-feature id space (FeatureSchema.num_ids).
        num_cat_fields / num_multi_fields: fields per kind (model order: cat first).
        num_tags: tag catalogue size (tag id 0 is padding).
        embed_dim: user field embedding size d.
        tag_dim: tag embedding size.
        out_dim: user/tag vector size D (cosine space).
        experts: number of experts / virtual kernels.
        task_experts: task -> expert indices (0-based) that serve it.
        expert_hidden: hidden sizes of each expert tower (MVKE, MoE, MMoE, CGC).
        tower_hidden: hidden sizes of noMTL's tower and of Hard Sharing's shared bottom (its
            last entry is the bottom's output).
        head_hidden: hidden sizes of Hard Sharing's per-task heads.
        attn_dim: size of MVKE's attention keys and queries.
        attention: MVKE expert attention over the fields (mvke/models/mvke.py): "values"
            (field value maps shared by the experts, weighted sum per expert), "fields" (each
            field scaled by F * its weight before per-expert towers), "residual" (the published
            code's form) or "uniform" (control: every weight exactly 1/F).
        gate: MVKE gate: "bilinear" (softmax over the task's kernels of E_T^T W VK; ours),
            "plain" (softmax of E_T . VK: the published code's vkg_layer), "projected" (paper
            eq. 7: Q(E_T).K(VK)/sqrt(d) with sigma) or "uniform" (control: exactly 1/K_task).
        gate_value: apply a per-task linear V(.) to the expert outputs in the gate (eq. 7).
        activation: activation of every MLP tower (MVKE's expert towers, the baselines' towers).
        attn_activation: the sigma of eq. 4 on MVKE's attention projections; None = same as
            `activation`. The published code uses linear projections ("identity").
        dropout: dropout after every hidden layer of every tower.
        init_scale: initial cosine temperature s.
        tag_groups: per tag id (index 0 = padding) the id of its parent in the tag taxonomy
            (1-based; 0 = none), from the catalogue names `parent/tag` (`tag_groups_of`). The tag
            tower adds the parent's embedding to the tag's own, so a rare tag starts from what its
            siblings learned. Empty: tag ids only (the paper's tag tower).
        kernel_init: std of the normal initialisation of MVKE's virtual kernels.
        field_norm: LayerNorm each (pooled) field embedding before the towers, every model.
    """

    name: str = "mvke-mt"
    tasks: list[str] = field(default_factory=lambda: ["interest", "intention"])
    num_ids: int = 0
    num_cat_fields: int = 0
    num_multi_fields: int = 0
    num_tags: int = 0
    embed_dim: int = 16
    tag_dim: int = 32
    out_dim: int = 32
    experts: int = 5
    task_experts: dict[str, list[int]] = field(
        default_factory=lambda: {"interest": [0, 1, 2], "intention": [1, 2, 3, 4]})
    expert_hidden: list[int] = field(default_factory=lambda: [128])
    tower_hidden: list[int] = field(default_factory=lambda: [256, 128])
    head_hidden: list[int] = field(default_factory=lambda: [64])
    attn_dim: int = 16
    attention: str = "values"
    gate: str = "bilinear"
    gate_value: bool = False
    activation: str = "relu"
    attn_activation: str | None = "identity"
    dropout: float = 0.0
    init_scale: float = 5.0
    kernel_init: float = 1.0
    field_norm: bool = True
    tag_groups: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.gate == "dot":   # the name this gate had before the published code was checked
            self.gate = "bilinear"

    @property
    def num_fields(self) -> int:
        return self.num_cat_fields + self.num_multi_fields


def tag_groups_of(tags: list[str], sep: str = "/") -> list[int]:
    """Per tag id (0 = padding) the 1-based id of its parent `parent` in a name `parent/tag`, 0 if none.

    Returns [] when no tag has a parent (MovieLens genres), so such models are the plain id tower."""
    parents = [t.rsplit(sep, 1)[0] if sep in t else None for t in tags]
    names = sorted({p for p in parents if p is not None})
    if not names:
        return []
    index = {n: i + 1 for i, n in enumerate(names)}
    return [0] + [index[p] if p is not None else 0 for p in parents]


def mlp(in_dim: int, hidden: list[int], out_dim: int | None, activation: str = "relu",
        dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_dim = h
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class FieldEmbedding(nn.Module):
    """One table for every user field; multi-valued fields are masked-mean pooled.

    Mean pooling (not sum) keeps a field's scale independent of how long the
    user's history is; an empty history gives a zero vector. With `norm`, each
    pooled field embedding is LayerNorm'ed (one LayerNorm(d) shared by the fields).
    """

    def __init__(self, num_ids: int, dim: int, norm: bool = False):
        super().__init__()
        self.table = nn.Embedding(num_ids, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, 0, 0.05)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor) -> torch.Tensor:
        cat = self.table(cat_ids)                                    # [B, Fc, d]
        multi = self.table(multi_ids)                                # [B, Fm, L, d]
        count = (multi_ids > 0).sum(-1, keepdim=True).clamp(min=1)  # [B, Fm, 1]
        pooled = multi.sum(2) / count.to(multi.dtype)                # [B, Fm, d]
        return self.norm(torch.cat([cat, pooled], 1))                # [B, F, d]


class BatchedMLP(nn.Module):
    """K independent MLPs applied as batched matmuls (one MatMul per layer in ONNX)."""

    def __init__(self, k: int, in_dim: int, hidden: list[int], out_dim: int, activation: str = "relu",
                 dropout: float = 0.0):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(k, a, b)
            for i in range(k):
                nn.init.kaiming_uniform_(w[i].T, a=math.sqrt(5))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(k, 1, b)))
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [K, B, in]
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.matmul(x, w) + b                               # [K, B, h]
            if i < n - 1:
                x = self.drop(self.act(x))
        return x


class TagTower(nn.Module):
    """Hard-shared tag embedding table, one small tower per task (paper 5.1)."""

    def __init__(self, cfg: ModelConfig, tasks: list[str]):
        super().__init__()
        self.table = nn.Embedding(cfg.num_tags + 1, cfg.tag_dim, padding_idx=0)
        nn.init.normal_(self.table.weight, 0, 0.05)
        self.group = None
        if cfg.tag_groups:
            if len(cfg.tag_groups) != cfg.num_tags + 1:
                raise ValueError(f"tag_groups has {len(cfg.tag_groups)} entries, expected num_tags + 1 = "
                                 f"{cfg.num_tags + 1}")
            self.register_buffer("group_of", torch.tensor(cfg.tag_groups, dtype=torch.long), persistent=False)
            self.group = nn.Embedding(max(cfg.tag_groups) + 1, cfg.tag_dim, padding_idx=0)
            nn.init.normal_(self.group.weight, 0, 0.05)
        self.towers = nn.ModuleList(mlp(cfg.tag_dim, [cfg.tag_dim * 2], cfg.out_dim, "relu") for _ in tasks)

    def pooled(self, tag_ids: torch.Tensor) -> torch.Tensor:
        emb = self.table(tag_ids)                                    # [B, L, t]
        if self.group is not None:                                   # + the parent's embedding
            emb = emb + self.group(self.group_of[tag_ids])           # [B, L, t]
        count = (tag_ids > 0).sum(-1, keepdim=True).clamp(min=1)
        return emb.sum(1) / count.to(emb.dtype)                      # [B, t]

    def forward(self, tag_ids: torch.Tensor) -> list[torch.Tensor]:
        pooled = self.pooled(tag_ids)
        return [tower(pooled) for tower in self.towers]              # per task [B, D]


class TwoTowerTagger(nn.Module):
    """Base class: the scoring every model shares, so training, export and serving agree."""

    tasks: list[str]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        n = len(self.tasks)
        self.log_scale = nn.Parameter(torch.full((n,), math.log(cfg.init_scale)))
        self.bias = nn.Parameter(torch.zeros(n))

    # -- the two sides ---------------------------------------------------
    def user_vectors(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per task: value-transformed expert outputs [B, K_task, D]."""
        raise NotImplementedError

    def tag_vectors(self, tag_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per task: (tag embedding [B, D], gate weights [B, K_task]) for tag sets [B, L]."""
        raise NotImplementedError

    def experts_per_task(self) -> list[int]:
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------
    def task_logits(self, users: list[torch.Tensor], tags: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        out = []
        for i, (v, (e_t, gate)) in enumerate(zip(users, tags)):
            e_u = torch.einsum("bk,bkd->bd", gate, v)                # [B, D]
            cos = F.cosine_similarity(e_u, e_t, dim=-1, eps=1e-8)    # [B]
            out.append(self.log_scale[i].exp() * cos + self.bias[i])
        return torch.stack(out, 1)                                   # [B, n_tasks]

    def forward(self, cat_ids: torch.Tensor, multi_ids: torch.Tensor, tag_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_tasks]; probabilities are their sigmoid."""
        return self.task_logits(self.user_vectors(cat_ids, multi_ids), self.tag_vectors(tag_ids))

    def all_tag_vectors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tag side for every catalogue tag, one at a time (ids 1..T): per task ([T, D], [T, K])."""
        ids = torch.arange(1, self.cfg.num_tags + 1).unsqueeze(1)
        return self.tag_vectors(ids)

    def task_scales(self) -> tuple[list[float], list[float]]:
        return self.log_scale.exp().tolist(), self.bias.tolist()


class PerTaskModel(TwoTowerTagger):
    """One independent model per task (noMTL, MVKE-st): nothing is shared."""

    def __init__(self, cfg: ModelConfig, make: "type[TwoTowerTagger]"):
        super().__init__(cfg)
        subs = []
        for t in self.tasks:
            sub_cfg = ModelConfig(**{**cfg.__dict__, "tasks": [t],
                                     "task_experts": {t: cfg.task_experts.get(t, list(range(cfg.experts)))}})
            subs.append(make(sub_cfg))
        self.models = nn.ModuleList(subs)
        # Each sub-model holds its own scale/bias; the wrapper's are unused.
        self.log_scale.requires_grad_(False)
        self.bias.requires_grad_(False)

    def user_vectors(self, cat_ids, multi_ids):
        return [m.user_vectors(cat_ids, multi_ids)[0] for m in self.models]

    def tag_vectors(self, tag_ids):
        return [m.tag_vectors(tag_ids)[0] for m in self.models]

    def experts_per_task(self):
        return [m.experts_per_task()[0] for m in self.models]

    def task_logits(self, users, tags):
        return torch.cat([m.task_logits([u], [t]) for m, u, t in zip(self.models, users, tags)], 1)

    def task_scales(self):
        s = [m.task_scales() for m in self.models]
        return [x[0][0] for x in s], [x[1][0] for x in s]


class MixedUserTagger(TwoTowerTagger):
    """Base of the baselines: the user tower mixes inside and yields one vector per task.

    Export sees K_task = 1 and a gate weight of 1 for every tag, so the same
    bundle format and service serve these models unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.embedding = FieldEmbedding(cfg.num_ids, cfg.embed_dim, cfg.field_norm)
        self.tag_tower = TagTower(cfg, self.tasks)
        self.flat_dim = cfg.num_fields * cfg.embed_dim

    def task_embeddings(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per task user embedding [B, D] from the flattened field embeddings [B, F*d]."""
        raise NotImplementedError

    def user_vectors(self, cat_ids, multi_ids):
        flat = self.embedding(cat_ids, multi_ids).flatten(1)            # [B, F*d]
        return [e.unsqueeze(1) for e in self.task_embeddings(flat)]     # per task [B, 1, D]

    def tag_vectors(self, tag_ids):
        out = []
        for e_t in self.tag_tower(tag_ids):
            out.append((e_t, torch.ones(e_t.shape[0], 1, dtype=e_t.dtype)))  # [B, D], [B, 1]
        return out

    def experts_per_task(self):
        return [1] * len(self.tasks)


def expert_pool(cfg: ModelConfig, in_dim: int) -> BatchedMLP:
    """The K expert towers of MoE, MMoE and CGC: the same size as MVKE's."""
    return BatchedMLP(cfg.experts, in_dim, cfg.expert_hidden, cfg.out_dim, cfg.activation, cfg.dropout)


def gated_mixture(experts: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """experts [B, E, h], gate logits [B, E] -> softmax-weighted sum [B, h]."""
    return torch.einsum("be,beh->bh", torch.softmax(gate_logits, -1), experts)
