"""Models: the two-tower contract of every registered model, and MVKE's experts, gates and kernels."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvke.models import MODELS, build_torch_model
from mvke.models.mvke import MVKE
from mvke.training.trainer import model_config_for

torch.set_num_threads(1)  # 2 shared cores: one thread is the fastest for tiny models

DEFAULT_ASSIGNMENT = {"interest": [0, 1, 2], "intention": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def batch(tiny_synth_data):
    """64 training samples (several with 2-3 tags) as tensors, plus their labels."""
    s = tiny_synth_data.train
    idx = np.arange(64)
    assert (s.tag_ids[idx] > 0).sum(1).max() > 1
    return tuple(torch.from_numpy(a[idx]) for a in (s.cat_ids, s.multi_ids, s.tag_ids, s.labels))


@pytest.fixture
def make(tiny_synth_data, tiny_model_sizes):
    def make(name: str, **overrides):
        torch.manual_seed(0)
        return build_torch_model(model_config_for(name, tiny_synth_data, **{**tiny_model_sizes, **overrides}))
    return make


@pytest.mark.parametrize("name", list(MODELS))
def test_model_contract_shapes(name, make, batch, tiny_synth_data):
    model = make(name).eval()
    cat, multi, tags, _ = batch
    B, T, D = len(cat), len(model.tasks), model.cfg.out_dim
    n_tags = len(tiny_synth_data.dataset.tags)
    logits = model(cat, multi, tags)
    assert logits.shape == (B, T) and torch.isfinite(logits).all()
    users, tag_side, k = model.user_vectors(cat, multi), model.tag_vectors(tags), model.experts_per_task()
    assert len(users) == len(tag_side) == len(k) == T
    for i in range(T):
        assert users[i].shape == (B, k[i], D)
        e_t, gate = tag_side[i]
        assert e_t.shape == (B, D) and gate.shape == (B, k[i])
        # Gate weights are a distribution over the task's experts.
        assert (gate >= 0).all()
        torch.testing.assert_close(gate.sum(-1), torch.ones(B))
    # The logits are exactly the scoring of the two sides (what export and serving do).
    torch.testing.assert_close(model.task_logits(users, tag_side), logits)
    # One tag at a time for the whole catalogue (the precomputed tag side).
    for i, (e_t, gate) in enumerate(model.all_tag_vectors()):
        assert e_t.shape == (n_tags, D) and gate.shape == (n_tags, k[i])
    scales, biases = model.task_scales()
    assert len(scales) == len(biases) == T


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_every_parameter(name, make, batch):
    model = make(name).train()
    cat, multi, tags, labels = batch
    loss = F.binary_cross_entropy_with_logits(model(cat, multi, tags), labels)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["mvke-mt", "mvke-st"])
def test_experts_per_task_follow_the_assignment(name, make, batch):
    cat, multi, tags, _ = batch
    for experts, assignment in ((5, DEFAULT_ASSIGNMENT), (4, {"interest": [0, 1], "intention": [1, 2, 3]}),
                                (3, {"interest": [0, 1, 2], "intention": [2]})):
        model = make(name, experts=experts, task_experts=assignment)
        want = [len(assignment[t]) for t in model.tasks]
        assert model.experts_per_task() == want
        assert [u.shape[1] for u in model.user_vectors(cat, multi)] == want
        assert [g.shape[1] for _, g in model.tag_vectors(tags)] == want


@pytest.mark.parametrize("gate", ["projected", "bilinear", "plain"])
@pytest.mark.parametrize("attention", ["values", "fields", "residual"])
def test_mvke_gate_and_field_attention_are_distributions(make, batch, gate, attention):
    model = make("mvke-mt", gate=gate, attention=attention).eval()
    cat, multi, tags, _ = batch
    w = model.field_attention(cat, multi)                               # [B, F, K]
    assert w.shape == (len(cat), model.cfg.num_fields, model.cfg.experts)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(len(cat), model.cfg.experts))
    for i, (_, g) in enumerate(model.tag_vectors(tags)):
        assert g.shape[1] == len(model.cfg.task_experts[model.tasks[i]])
        torch.testing.assert_close(g.sum(-1), torch.ones(len(cat)))
    assert model(cat, multi, tags).shape == (len(cat), 2)


def _expert_grads(model: MVKE, k: int) -> list[torch.Tensor]:
    """Gradients of everything that belongs to expert k alone: its kernel and its tower."""
    ex = model.experts
    own = [ex.kernels.grad[k]] + [w.grad[k] for w in ex.towers.weights] + [b.grad[k] for b in ex.towers.biases]
    return own + ([ex.value_bias.grad[k]] if hasattr(ex, "value_bias") else [])


@pytest.mark.parametrize("gate", ["projected", "bilinear", "plain"])
@pytest.mark.parametrize("attention", ["values", "fields", "residual"])
def test_task_loss_reaches_only_the_task_experts(make, batch, gate, attention):
    model = make("mvke-mt", gate=gate, attention=attention).train()
    assert model.cfg.task_experts == DEFAULT_ASSIGNMENT and model.cfg.experts == 5
    cat, multi, tags, labels = batch
    only = {"interest": {0}, "intention": {3, 4}}                    # experts serving one task alone
    for i, task in enumerate(model.tasks):
        other = model.tasks[1 - i]
        model.zero_grad(set_to_none=False)
        logits = model(cat, multi, tags)
        F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i]).backward()
        for k in only[other]:                                        # e.g. click loss -> experts 3, 4
            for g in _expert_grads(model, k):
                assert torch.count_nonzero(g) == 0, (task, k)
        for k in model.cfg.task_experts[task]:
            kernel_grad, *tower_grads = _expert_grads(model, k)
            assert kernel_grad.abs().sum() > 0, f"{task} loss: virtual kernel {k} gets no gradient"
            assert any(g.abs().sum() > 0 for g in tower_grads), (task, k)


BAD_ASSIGNMENTS = {
    "index out of range": (5, {"interest": [0, 1, 5], "intention": [1, 2, 3, 4]},
                           "task 'interest': expert index 5 out of range 0..4"),
    "negative index": (5, {"interest": [0, 1, 2], "intention": [-1, 2, 3, 4]},
                       "task 'intention': expert index -1 out of range 0..4"),
    "task with no expert": (5, {"interest": [], "intention": [0, 1, 2, 3, 4]},
                            "task 'interest' is assigned no expert"),
    "task missing": (5, {"interest": [0, 1, 2, 3, 4]}, "task 'intention' has no expert assignment"),
    "repeated index": (5, {"interest": [0, 1, 1], "intention": [2, 3, 4]}, "task 'interest': expert indices repeat"),
    "unused expert": (6, DEFAULT_ASSIGNMENT, "experts [5] serve no task"),
    "no experts": (0, {"interest": [], "intention": []}, "experts must be >= 1, got 0"),
}
# Models whose user tower is built from the expert assignment.
ASSIGNMENT_MODELS = ["mvke-mt", "mvke-st", "cgc"]


@pytest.mark.parametrize("name", ASSIGNMENT_MODELS)
@pytest.mark.parametrize("case", list(BAD_ASSIGNMENTS))
def test_bad_expert_assignment_fails_at_construction(make, name, case):
    assert name in MODELS
    experts, assignment, message = BAD_ASSIGNMENTS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        make(name, experts=experts, task_experts=assignment)


def test_unknown_model_name(make):
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from mvke-mt"):
        make("nope")


# ---------------------------------------------------------------- controls of the virtual kernels
def test_uniform_gate_control_is_exactly_one_over_k(make, batch):
    model = make("mvke-uniform-gate").eval()
    assert model.cfg.gate == "uniform"
    for (_, g), k in zip(model.all_tag_vectors(), model.experts_per_task()):
        assert torch.equal(g, torch.full_like(g, 1.0 / k))
    # Its kernels still steer the experts' attention (not uniform over the fields).
    w = model.field_attention(batch[0], batch[1])
    assert (w - 1.0 / w.shape[1]).abs().max() > 1e-3


def test_no_kernel_attention_control_is_exactly_uniform_over_fields(make, batch):
    model = make("mvke-no-kernel-attention").eval()
    cat, multi, tags, _ = batch
    w = model.field_attention(cat, multi)
    assert torch.equal(w, torch.full_like(w, 1.0 / model.cfg.num_fields))
    # Uniform weights make the value maps one shared linear layer over the concatenated fields.
    ex = model.experts
    F, d, h = ex.values.shape
    shared = model.embedding(cat, multi).flatten(1) @ ex.values.reshape(F * d, h)      # [B, h]
    want = ex.towers(ex.value_act(shared.unsqueeze(0) + ex.value_bias)).transpose(0, 1)
    torch.testing.assert_close(model.expert_outputs(cat, multi), want)
    assert not any("field_keys" in n or ".q." in n for n, _ in model.named_parameters())


def test_plain_gate_is_the_published_vkg_layer(make, batch):
    """softmax(tag_emb . VK^T) over the task's kernels, no projection (core/mvke_ops.py, vkg_layer)."""
    model = make("mvke-plain-gate").eval()
    tags = batch[2]
    e_ts = model.tag_tower(tags)
    for i, (e_t, g) in enumerate(model.tag_vectors(tags)):
        vk = model.experts.kernels[model.cfg.task_experts[model.tasks[i]]]
        torch.testing.assert_close(g, torch.softmax(e_ts[i] @ vk.T, -1))
    assert not any(n.startswith("gates.") for n, _ in model.named_parameters())


def test_bilinear_gate_has_its_projection(make, batch):
    model = make("mvke-mt").eval()
    assert model.cfg.gate == "bilinear"
    e_ts = model.tag_tower(batch[2])
    for i, (_, g) in enumerate(model.tag_vectors(batch[2])):
        vk = model.experts.kernels[model.cfg.task_experts[model.tasks[i]]]
        torch.testing.assert_close(g, torch.softmax(model.gates[i].proj(e_ts[i]) @ vk.T, -1))


def test_legacy_gate_name_maps_to_bilinear(make):
    assert make("mvke-mt", gate="dot").cfg.gate == "bilinear"


def test_tag_groups_from_catalogue_names():
    from mvke.models.layers import tag_groups_of
    assert tag_groups_of(["cat1/tag1", "cat0/tag2", "cat1/tag3"]) == [0, 2, 1, 2]
    assert tag_groups_of(["Action", "Comedy"]) == []          # no taxonomy: the plain id tower
    assert tag_groups_of(["a/b/x", "plain"]) == [0, 1, 0]      # the parent is everything before the last '/'


def test_tag_tower_adds_the_parent_embedding_shared_by_siblings():
    import torch
    from mvke.models import ModelConfig, build_torch_model
    cfg = ModelConfig(name="mvke-mt", num_ids=50, num_cat_fields=2, num_multi_fields=1, num_tags=3,
                      tag_groups=[0, 1, 1, 2])
    model = build_torch_model(cfg)
    tower = model.tag_tower
    with torch.no_grad():
        before = tower.pooled(torch.tensor([[1], [2], [3]]))
        tower.group.weight[1] += 1.0                              # move parent 1 only
        after = tower.pooled(torch.tensor([[1], [2], [3]]))
    moved = (after - before).abs().sum(1)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0      # tags 1 and 2 share parent 1, tag 3 does not
    with pytest.raises(ValueError, match="tag_groups"):
        build_torch_model(ModelConfig(name="mvke-mt", num_ids=50, num_cat_fields=2, num_multi_fields=1, num_tags=3,
                                tag_groups=[0, 1]))
