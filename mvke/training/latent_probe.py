"""The linear probe of the learning curve: what a linear read of a user's feature row gives.

Definition (stated here because docs/MODELS.md's 0.798 / 0.834 came from a script that is not in the
repository; this is a re-implementation from its description, "a linear probe on the histories",
in the frame of docs/DATA.md 1.5, which replaces parts of the latent state in the true logits):

* features: the user's 26 raw fields as one-hot (single-valued) and length-normalised multi-hot
  (histories: the mean pooling the models use) over the values the world can produce, plus a constant;
* targets: the user's training-day latent state (the features are a snapshot of that day): the click and
  conversion facets z (M x D each) and the click and conversion propensities beta, gamma;
* ridge regression (lambda = 1) fitted on the first blocks of users (at most FIT_USERS), evaluated on
  the next blocks (at most EVAL_USERS) of the same world (seed 0 of the size);
* the test-day logits computed with the estimated state in place of the user's (drifted) test-day
  state, the tags' vectors and the intercepts exact: CTR AUC of p_click against the clicks, CVR AUC of
  p_click x p(conversion | click) against the conversions, as the oracle is scored.

The tag side is exact, so this is the ceiling of a model that reads users linearly and knows every
tag perfectly, not a trained model. The worlds of the curve are nested (blocks are seeded by
(seed, block)), so the sizes above 80k fit on the same users and differ only in the evaluation blocks.
`python -m mvke.training.latent_probe` writes docs/results/learning_curve/probe.json.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from mvke.data.synthetic import (BASIC_FIELDS, HISTORY_FIELDS, STAT_FIELDS, USER_BLOCK, Block, SynthConfig, World,
                                 _sigmoid, blocks, draw_block)
from mvke.training.metrics import auc

FIT_USERS = 16 * USER_BLOCK     # 65,536: the probe has ~4,000 inputs; more users do not move it
EVAL_USERS = 4 * USER_BLOCK
RIDGE = 1.0


def columns(cfg: SynthConfig) -> dict[str, dict[str, int]]:
    """Feature column of every value each field can take ({field: {value: column}}); column 0 = constant."""
    out, n = {}, 1
    values = {name: [f"{name[:3]}{v}" for v in range(k)] for name, k in BASIC_FIELDS.items()}
    for name, (_, _, kind, _) in HISTORY_FIELDS.items():
        size, prefix = (cfg.categories, "c") if kind == "cat" else (cfg.tags, "t")
        values[name] = [f"{prefix}{v:04d}" for v in range(size)]
    values |= {name: [f"b{b}" for b in range(10)] for name in STAT_FIELDS}
    for name, vals in values.items():
        out[name] = {v: n + i for i, v in enumerate(vals)}
        n += len(vals)
    return out


def features(block: Block, cols: dict[str, dict[str, int]]) -> sp.csr_matrix:
    users = block.frames["users"]
    rows, cs, vals = [np.arange(len(users))], [np.zeros(len(users), np.int64)], [np.ones(len(users))]
    for name, index in cols.items():
        for u, v in enumerate(users[name]):
            items = list(v) if name in HISTORY_FIELDS else [v]
            if items:
                rows.append(np.full(len(items), u))
                cs.append(np.array([index[x] for x in items]))
                vals.append(np.full(len(items), 1.0 / len(items)))
    n_cols = 1 + sum(len(c) for c in cols.values())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cs))), shape=(len(users), n_cols))


def targets(block: Block) -> np.ndarray:
    u = block.users
    n = len(u)
    return np.concatenate([u.z_click.reshape(n, -1), u.z_conv.reshape(n, -1), u.beta[:, None], u.gamma[:, None]], 1)


def with_state(users, y: np.ndarray):
    """`users` with the latent state read from the probe's outputs (same layout as `targets`)."""
    n, (m, d) = len(users), users.z_click.shape[1:]
    k = m * d
    return replace(users, z_click=y[:, :k].reshape(n, m, d), z_conv=y[:, k:2 * k].reshape(n, m, d),
                   beta=y[:, 2 * k], gamma=y[:, 2 * k + 1])


def probe(users: int, seed: int = 0) -> dict:
    """CTR / CVR AUC of the linear probe on the world of `users` users (generator seed `seed`)."""
    world = World(SynthConfig(users=users, seed=seed))
    cols = columns(world.cfg)
    all_blocks = list(blocks(world.cfg))
    n_eval = max(1, min(EVAL_USERS // USER_BLOCK, len(all_blocks) // 5))
    fit_blocks = all_blocks[:-n_eval][:FIT_USERS // USER_BLOCK]
    eval_blocks = all_blocks[len(fit_blocks):len(fit_blocks) + n_eval]
    xtx, xty = None, None
    for b in fit_blocks:
        block = draw_block(world, b)
        x, y = features(block, cols), targets(block)
        xtx = (x.T @ x).toarray() + (0 if xtx is None else xtx)
        xty = x.T @ y + (0 if xty is None else xty)
    w = np.linalg.solve(xtx + RIDGE * np.eye(len(xtx)), xty)
    labels, scores = [], []
    for b in eval_blocks:
        block = draw_block(world, b)
        est = with_state(block.test_users, features(block, cols) @ w)
        imp = block.test_impressions
        lc, lv = world.logits(est, imp["rows"], imp["tags"])
        p_click = _sigmoid(lc + world.b_click)
        scores.append(np.stack([p_click, p_click * _sigmoid(lv + world.b_conv)], 1))
        labels.append(block.frames["test"][["click", "conversion"]].to_numpy())
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    return {"ctr": auc(labels[:, 0], scores[:, 0]), "cvr": auc(labels[:, 1], scores[:, 1]),
            "fit_users": sum(min(USER_BLOCK, users - b * USER_BLOCK) for b in fit_blocks),
            "eval_users": sum(min(USER_BLOCK, users - b * USER_BLOCK) for b in eval_blocks), "seed": seed}


def main() -> None:
    from mvke.training.learning_curve_plan import OUT, PLAN
    out = {}
    for plan in PLAN:          # written after each size: a partial file is usable
        out[plan.name] = probe(plan.users)
        print(plan.name, out[plan.name], flush=True)
        (OUT / "probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
