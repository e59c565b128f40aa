"""A non-neural reference on the same features: LightGBM per task on the user features plus the tag.

Input per sample (one sparse matrix): every single-valued field as a categorical column
(its global feature id), the ad's tag ids as three categorical columns (0 = no tag), and
every multi-valued field as multi-hot columns over its ids. One binary LightGBM model per
task, early-stopped on the validation split; the test split is scored once. Fixed
settings (not tuned): it is a reference point, reported beside the oracle.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from mvke.data.dataset import MAX_TAGS_PER_AD, TASKS, EncodedSplit
from mvke.training.metrics import auc, gauc

PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 50,
          "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
          "max_cat_to_onehot": 8, "cat_smooth": 10, "verbose": -1}
MAX_ROUNDS, EARLY_STOP = 1000, 30


def features(split: EncodedSplit, num_ids: int) -> sp.csr_matrix:
    """[N, F_cat + 3 + num_ids]: categorical ids, tag slots, multi-hot history ids."""
    n = len(split)
    dense = np.concatenate([np.asarray(split.cat_ids), split.tag_ids[:, :MAX_TAGS_PER_AD]], 1).astype(np.float32)
    flat = np.asarray(split.multi_ids).reshape(n, -1)     # a Gathered split (prepare_parts) materialises here
    rows, cols = np.nonzero(flat)
    ids = flat[rows, cols]
    multi = sp.csr_matrix((np.ones(len(ids), np.float32), (rows, ids)), shape=(n, num_ids))
    multi.sum_duplicates()
    multi.data[:] = 1.0
    return sp.hstack([sp.csr_matrix(dense), multi], format="csr")


def gbdt_reference(data, seed: int = 0, threads: int = 1) -> dict:
    """Fit per task on train, stop on valid, score test: AUC and gAUC per task."""
    import lightgbm as lgb
    t0 = time.perf_counter()
    n_ids = data.schema.num_ids
    x_train, x_valid, x_test = (features(s, n_ids) for s in (data.train, data.valid, data.test))
    categorical = list(range(data.train.cat_ids.shape[1] + MAX_TAGS_PER_AD))
    params = {**PARAMS, "seed": seed, "num_threads": threads}
    out: dict = {"model": "lightgbm", "params": params, "valid_auc": {}, "test_auc": {}, "test_gauc": {},
                 "best_rounds": {}}
    for i, task in enumerate(TASKS):
        train = lgb.Dataset(x_train, data.train.labels[:, i], categorical_feature=categorical, free_raw_data=False)
        valid = lgb.Dataset(x_valid, data.valid.labels[:, i], reference=train, categorical_feature=categorical)
        booster = lgb.train(params, train, MAX_ROUNDS, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)])
        out["best_rounds"][task] = booster.best_iteration
        out["valid_auc"][task] = auc(data.valid.labels[:, i], booster.predict(x_valid, num_iteration=booster.best_iteration))
        p = booster.predict(x_test, num_iteration=booster.best_iteration)
        out["test_auc"][task] = auc(data.test.labels[:, i], p)
        out["test_gauc"][task] = gauc(data.test.user_ids, data.test.labels[:, i], p)
    out["seconds"] = time.perf_counter() - t0
    return out
