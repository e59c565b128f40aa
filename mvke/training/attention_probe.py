"""How MVKE's field attention and gates move during training, per design (docs/MODELS.md).

    python -m mvke.training.attention_probe DATA_DIR [--steps 900]

Trains mvke-mt for `--steps` Adam steps (batch 256, lr 2e-3, seed 0) once per design and
prints, at step 0 and every third of the run, the normalised entropy of each expert's
attention over the fields (mean over up to 4,096 validation users) and of each task's gate
over its experts (mean over the catalogue), then the validation AUC. One JSON line per design.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mvke.models import build_torch_model
from mvke.training.metrics import normalised_entropy
from mvke.training.trainer import TrainConfig, batches, evaluate, make_optimizer, model_config_for, prepare, train_step

DESIGNS = {
    "before: residual, ReLU'd Q/K/V, kernels N(0, 0.01), no field norm":
        dict(attention="residual", attn_activation="relu", kernel_init=0.01, field_norm=False),
    "residual, field norm, linear Q/K/V, kernels N(0, 1)": dict(attention="residual"),
    "fields: F * w scaling, field keys": dict(attention="fields"),
    "values (default)": dict(),
}


@torch.no_grad()
def entropies(model, data, rows: int = 4096) -> dict:
    model.eval()
    idx = np.arange(min(rows, len(data.valid)))
    w = model.field_attention(torch.from_numpy(data.valid.cat_ids[idx]), torch.from_numpy(data.valid.multi_ids[idx]))
    gates = [g.numpy() for _, g in model.all_tag_vectors()]
    model.train()
    return {"attention": [round(float(x), 4) for x in normalised_entropy(w.numpy(), 1).mean(0)],
            "gate": [round(float(normalised_entropy(g, 1).mean()), 4) for g in gates]}


def probe(data, overrides: dict, steps: int, batch_size: int = 256, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_torch_model(model_config_for("mvke-mt", data, **overrides))
    opt, _ = make_optimizer(model, TrainConfig(lr=2e-3), 1)
    rng = np.random.default_rng(0)
    it = batches(data.train, batch_size, rng)
    log = [{"step": 0, **entropies(model, data)}]
    t0 = time.process_time()
    for step in range(1, steps + 1):
        batch = next(it, None)
        if batch is None:
            it = batches(data.train, batch_size, rng)
            batch = next(it)
        train_step(model, opt, batch)
        if step % max(1, steps // 3) == 0:
            log.append({"step": step, **entropies(model, data)})
    valid = evaluate(model, data.valid)
    return {"log": log, "valid_auc": {k: round(v, 4) for k, v in valid.items()}, "cpu_seconds": round(time.process_time() - t0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mvke.training.attention_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=900)
    a = p.parse_args(argv)
    data = prepare(a.data)
    for label, over in DESIGNS.items():
        print(json.dumps({"design": label, **probe(data, over, a.steps)}), flush=True)


if __name__ == "__main__":
    main()
