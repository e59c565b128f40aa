"""The value of fresh features (issue 22): test-day AUC per task when each impression's features are
refreshed by that day's earlier events vs the start-of-day snapshot, same model.

    nice -n 10 env PYTHONPATH=. python scripts/events_value.py --work runs/events_value --users 3000 --days 4

1. A synthetic world with days (mvke/data/days.py) and a model (mvke-mt) trained on every day but
   the last (model_export/cycle.py `train_candidate`: the daily loop's training, point-in-time rows).
2. The last day's impressions scored twice by that model:
   * snapshot: each row with the user's features at the end of the day before (what a service
     whose features are loaded once a day answers with, and how the model was trained);
   * fresh: the same rows, the event-driven fields (the days world's EVENT_RULES: clicked_tags,
     converted_tags) as the event path leaves them just before the impression: the day's click and
     conversion events with an earlier timestamp (strictly: a row's own click is not its feature)
     applied in time order by the apply script of `mvke features stream` (EventApplier, Lua) into
     a private redis-server that holds the start-of-day snapshot, read back before each row.
   The category histories and statistics of the days world are drawn from the latent state, not
   from events: they are the snapshot's in both arms.
   A control arm scores the rows with those fields empty: how much the model leans on them at all.
3. AUC and GAUC per task and arm on all rows, on the rows whose features the events changed, and on
   the rows of users with no event history at the day's start (cold users); fresh - snapshot AUC
   with a 95% interval (paired row bootstrap); the one-truth check: after the whole day, Redis
   holds exactly the end-of-day snapshot's histories.

Writes --out (docs/results/events_value.json) with the CPU model and load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(data: Path, home: Path, day: str, window: int, epochs: int) -> Path:
    """The daily loop's candidate for `day` (trained on the `window` days before it), once."""
    from model_export.cycle import CycleConfig, train_candidate
    from mvke.data.days import DaysLayout
    out = home / "model"
    if not (out / "config.json").exists():
        cfg = CycleConfig(data, day, home, window=window, train={"epochs": epochs, "threads": 2})
        log(f"training on {window} days before {day}: {train_candidate(cfg, DaysLayout(data), None, out)}")
    return out


def _store(values) -> str:
    return "|".join(str(x) for x in values) if values is not None and len(values) else ""


def fresh_histories(log_df: pd.DataFrame, start: pd.DataFrame, end: pd.DataFrame, fields: list[str]) -> tuple:
    """Per log row, each event-driven field as of just before the row (the apply script on a private
    Redis); -> (DataFrame of those fields, one-truth mismatches after the day, apply seconds)."""
    from mvke.data.days import EVENT_RULES
    from mvke.localredis import LocalRedis
    from mvke.runtime.event_apply import EventApplier
    from mvke.runtime.events import EventRules, log_row_events
    from mvke.runtime.keys import Keys
    rules, keys = EventRules.from_dict(EVENT_RULES), Keys("value")
    rows = log_df.assign(tags=log_df["tags"].map(list)).to_dict("records")
    events = sorted((e for i, r in enumerate(rows) for e in log_row_events(r, i)), key=lambda e: e.order)
    out = {f: [""] * len(rows) for f in fields}
    with LocalRedis() as srv:
        r = srv.client()
        pipe = r.pipeline(transaction=False)
        for uid, rec in zip(start["user_id"], start[fields].to_dict("records")):
            vals = {f: _store(rec[f]) for f in fields if _store(rec[f])}
            if vals:
                pipe.hset(keys.user(uid), mapping=vals)
        pipe.execute()
        applier, nxt, t_apply = EventApplier(r, keys, rules), 0, 0.0
        order = np.argsort(log_df["timestamp"].to_numpy(), kind="stable")
        ts = log_df["timestamp"].to_numpy()
        for group in np.split(order, np.flatnonzero(np.diff(ts[order])) + 1):   # rows of one second
            t, first = ts[group[0]], nxt
            while nxt < len(events) and events[nxt].ts < t:
                nxt += 1
            t0 = time.perf_counter()
            applier.apply(events[first:nxt])
            t_apply += time.perf_counter() - t0
            got = r.pipeline(transaction=False)
            for i in group:
                got.hmget(keys.user(rows[i]["user_id"]), fields)
            for i, vals in zip(group, got.execute()):
                for f, v in zip(fields, vals):
                    out[f][i] = v.decode() if v else ""
        applier.apply(events[nxt:])
        mismatch = 0
        for uid, rec in zip(end["user_id"], end[fields].to_dict("records")):
            stored = r.hmget(keys.user(uid), fields)
            mismatch += [(v or b"").decode() for v in stored] != [_store(rec[f]) for f in fields]
    return pd.DataFrame(out), mismatch, t_apply, len(events)


def figures(labels: np.ndarray, probs: np.ndarray, user_ids: np.ndarray) -> dict:
    from mvke.data.dataset import TASKS
    from mvke.training.metrics import auc, gauc
    return {t: {"auc": round(auc(labels[:, i], probs[:, i]), 5),
                "gauc": round(gauc(user_ids, labels[:, i], probs[:, i]), 5)} for i, t in enumerate(TASKS)}


def paired_delta(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 200, seed: int = 0) -> dict:
    """AUC(b) - AUC(a) per task on the same rows, with a 95% interval over n row bootstraps."""
    from mvke.data.dataset import TASKS
    from mvke.training.metrics import auc
    rng = np.random.default_rng(seed)
    out = {}
    for i, t in enumerate(TASKS):
        point = auc(labels[:, i], b[:, i]) - auc(labels[:, i], a[:, i])
        draws = []
        for _ in range(n):
            idx = rng.integers(0, len(labels), len(labels))
            draws.append(auc(labels[idx, i], b[idx, i]) - auc(labels[idx, i], a[idx, i]))
        lo, hi = np.nanpercentile(draws, [2.5, 97.5])
        out[t] = {"delta_auc": round(point, 5), "ci95": [round(float(lo), 5), round(float(hi), 5)]}
    return out


def score_arms(m, ds, arms: dict[str, pd.DataFrame], slices: dict[str, np.ndarray]) -> dict:
    """Each arm's AUC / GAUC on each slice of rows (one prediction per arm), and fresh - snapshot."""
    from mvke.data.dataset import encode_split
    from mvke.training.trainer import predict
    probs, labels, users = {}, None, None
    for name, df in arms.items():
        split = encode_split(ds, df, m.schema)
        probs[name], labels, users = predict(m.model, split), split.labels, df["user_id"].to_numpy()
    out = {sl: {"rows": int(mask.sum()), **{name: figures(labels[mask], p[mask], users[mask])
                                            for name, p in probs.items()}} for sl, mask in slices.items()}
    out["fresh_minus_snapshot_all_rows"] = paired_delta(labels, probs["snapshot"], probs["fresh"])
    return out


def arms_and_slices(day_log: pd.DataFrame, start: pd.DataFrame, fresh: pd.DataFrame, fields: list[str]) -> tuple:
    """-> (the day's rows joined with the start-of-day snapshot, the three arms' rows, the row slices)."""
    joined = day_log.merge(start, on="user_id", how="left", validate="many_to_one")
    as_lists = {f: fresh[f].map(lambda v: v.split("|") if v else []) for f in fields}
    arms = {"snapshot": joined, "fresh": joined.assign(**as_lists),
            "no_event_histories": joined.assign(**{f: [[]] * len(joined) for f in fields})}   # the control
    changed = np.zeros(len(joined), bool)
    cold = np.ones(len(joined), bool)
    for f in fields:
        changed |= fresh[f].to_numpy() != joined[f].map(_store).to_numpy()
        cold &= joined[f].map(_store).to_numpy() == ""
    return joined, arms, {"all_rows": np.ones(len(joined), bool), "rows_whose_features_changed": changed,
                          "rows_of_users_without_event_history_at_day_start": cold}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/events_value", help="days data and model (reused when there)")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--days", type=int, default=4, help="days in the world; the last is the test day")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/events_value.json")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from mvke.data.dataset import RawDataset
    from mvke.data.days import EVENT_RULES, SNAPSHOTS, USERS_FILE, DaysConfig, DaysLayout, generate_days
    from mvke.data.synthetic import SynthConfig
    from mvke.runtime.system import cpu_model
    from mvke.training.trainer import load_checkpoint
    work, load0 = Path(a.work), os.getloadavg()
    data = work / "days"
    if not (data / "meta.json").exists():
        log(f"generating {a.days} days of {a.users} users")
        generate_days(SynthConfig(users=a.users, seed=a.seed), DaysConfig(days=a.days), data)
    layout = DaysLayout(data)
    test_day = layout.days()[-1]
    m = load_checkpoint(train(data, work, test_day, a.days - 1, a.epochs))
    start, _ = layout.features_for(test_day)
    end = pd.read_parquet(data / SNAPSHOTS / f"day={test_day}" / USERS_FILE)
    day_log = layout.log(test_day)
    fields = [h["field"] for h in EVENT_RULES["histories"]]
    log(f"replaying {test_day}: {len(day_log)} impressions through the apply function")
    fresh, mismatch, apply_s, n_events = fresh_histories(day_log, start, end, fields)
    joined, arms, slices = arms_and_slices(day_log, start, fresh, fields)
    ds = RawDataset(data, {**layout.meta, "tags": m.tags}, joined, joined, start)
    doc = {"test_day": test_day, "rows": len(joined), "events_replayed": n_events, "fields_refreshed": fields,
           "arms": {"snapshot": "features at the end of the day before (how the model was trained)",
                    "fresh": "event-driven fields as the apply function leaves them just before the row",
                    "no_event_histories": "control: the event-driven fields empty"},
           "figures": score_arms(m, ds, arms, slices),
           "one_truth_mismatches_after_the_day": mismatch, "apply_seconds": round(apply_s, 2),
           "setup": {"users": a.users, "days": a.days, "train_window_days": a.days - 1, "epochs": a.epochs,
                     "model": "mvke-mt", "seed": a.seed},
           "machine": {"cpu": cpu_model() or platform.processor(), "nproc": os.cpu_count(),
                       "loadavg_start": [round(x, 2) for x in load0],
                       "loadavg_end": [round(x, 2) for x in os.getloadavg()]}}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    log(json.dumps({k: doc[k] for k in ("figures", "one_truth_mismatches_after_the_day")}))


if __name__ == "__main__":
    main()
