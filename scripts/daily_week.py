"""A simulated week of the daily loop, without the service: `mvke cycle` for days 2..D of a synthetic
world with days, one injected bad day, and the ramp completed at once after every passed day
(no live traffic here: the service's live figures and shadow are issue 23 §2.4).

    PYTHONPATH=. python scripts/daily_week.py --out runs/week --users 3000 --days 8 --bad-day 5

Writes OUT/results.json: per day the decision, its reasons, candidate and active AUC per task on
that day's rows, each step's wall and CPU seconds; and the value of the loop: the AUC on the last
day of the model the loop ends with vs the model frozen after the first cycle, on the same rows.
A private redis-server (mvke.localredis) holds the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import timedelta
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work directory (days data, cycle home, results.json)")
    p.add_argument("--users", type=int, default=3000, help="initial users (default 3000)")
    p.add_argument("--days", type=int, default=8, help="days in the world (default 8); cycles run for days 2..D")
    p.add_argument("--bad-day", type=int, default=5, help="the day (1-based) whose candidate trains on shuffled labels")
    p.add_argument("--window", type=int, default=3, help="training window in days (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per candidate (default 2)")
    p.add_argument("--warm-start", action="store_true", help="warm-start each candidate from the active checkpoint")
    p.add_argument("--policy", help="gate policy YAML (default: the documented defaults)")
    a = p.parse_args()

    from model_export.cycle import CycleConfig, _categories, run_cycle
    from model_export.publish import promote
    from mvke.data.days import DaysConfig, DaysLayout, generate_days, parse_day, view
    from mvke.data.synthetic import SynthConfig
    from mvke.localredis import LocalRedis
    from mvke.runtime.keys import Keys
    from mvke.training.gate import score
    from mvke.training.trainer import load_checkpoint

    out = Path(a.out)
    data, home = out / "days", out / "cycle"
    start = parse_day("2026-01-01")
    if not (data / "meta.json").exists():
        generate_days(SynthConfig(users=a.users, seed=0), DaysConfig(days=a.days), data)
    layout = DaysLayout(data)
    days = layout.days()
    rows, frozen = [], None
    with LocalRedis() as srv:
        r, keys = srv.client(), Keys()
        for k in range(2, a.days + 1):
            day = (start + timedelta(days=k - 1)).isoformat()
            cfg = CycleConfig(data, day, home, window=a.window, warm_start=a.warm_start,
                              train={"epochs": a.epochs, "threads": 2}, redis_url=srv.url,
                              shuffle_labels=(k == a.bad_day), policy=a.policy)
            t0 = time.perf_counter()
            res = run_cycle(cfg, say=lambda m: None)
            gate = json.loads((home / f"day={day}" / "gate.json").read_text())
            entry = {"day": day, "decision": res.decision, "injected_bad": k == a.bad_day, "reasons": res.reasons,
                     "candidate_auc": {t: v["auc"] for t, v in gate["candidate"]["tasks"].items()},
                     "active_auc": None if gate["active"] is None else
                     {t: v["auc"] for t, v in gate["active"]["tasks"].items()},
                     "active_version": gate["active_version"],
                     "steps": {n: {"wall_s": s.get("wall_seconds"), "cpu_s": s.get("cpu_seconds_step")}
                               for n, s in res.state["steps"].items() if n != "active"},
                     "cycle_wall_s": round(time.perf_counter() - t0, 1)}
            if res.decision == "published-canary":   # no live traffic here: the ramp completes at once
                entry["promoted"] = promote(r, keys)["active"]
            if frozen is None and res.decision != "rejected":
                frozen = res.state["steps"]["export"]["version"]
            rows.append(entry)
            print(json.dumps({x: entry[x] for x in ("day", "decision", "candidate_auc", "active_auc", "cycle_wall_s")}))
        last = days[-1]
        v = view(layout, [last])
        cats = _categories(v.rows)
        value = {}
        for name, version in (("loop", r.get(keys.active).decode()), ("frozen_after_first_cycle", frozen)):
            m = load_checkpoint(home / "models" / version)
            value[name] = {"version": version,
                           "auc": {t: f["auc"] for t, f in score(m.model, v.encode(m.schema, m.tags),
                                                                 cats).figures["tasks"].items()}}
    doc = {"days": rows, "value_of_the_loop": {"day": last, **value},
           "setup": {"users": a.users, "days": a.days, "window": a.window, "epochs": a.epochs,
                     "warm_start": a.warm_start, "bad_day": a.bad_day, "service": "none (no load, no shadow)"},
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "loadavg_at_end": os.getloadavg()}}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["value_of_the_loop"], indent=1))


if __name__ == "__main__":
    main()
