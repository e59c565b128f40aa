"""A simulated week of the daily loop with the service under load (issue 23 "What this must show").

    PYTHONPATH=. nice -n 10 python scripts/daily_week.py --out runs/week --users 2000 --days 8 --bad-day 5

For days 2..D of a synthetic world with days: `mvke cycle` (run_cycle) trains, gates and
publishes, then the feature store gets the snapshot of the end of the day before (the users'
features the day's requests are answered from); a passed candidate is ramped by
`mvke promote --auto` (auto_promote, every few seconds, with the trial's compressed step times:
--step-seconds, --step-answers) on the figures the service writes (answers, errors, shadow of
the canary on MVKE_SHADOW_SHARE of the active's traffic); once promoted, `mvke tag-all
--to-redis` refreshes every user's daily profile. `mvke serve` (one worker) answers
POST /users/{id}/tags at loadgen c=16 the whole time (one loadgen process per --load-chunk
seconds, back to back). One day's candidate trains on shuffled labels (--bad-day).

Writes OUT/results.json: per day the decision (`activated`, `promoted`, `rejected`,
`rolled back`), its reasons, candidate and active AUC per task on that day's rows, the ramp's
steps with their times, the shadow Jaccard@20 / score shift / canary latency, the requests and
non-200 answers the load saw during the day, wall and CPU seconds per step (train, gate, export,
publish, ramp, tag-all); the value of the loop (last-day AUC of the final model vs the model
frozen after the first cycle, same rows); CPU model and load averages. A private redis-server
(mvke.localredis) holds versions, features and profiles.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------- the load
class Load:
    """loadgen (c=16) against the service, one process per `chunk` seconds, back to back; each
    chunk's result is kept with its start and end time, so a day's requests are the chunks in it."""

    def __init__(self, port: int, users: list[str], concurrency: int, chunk: float, log: Path):
        reqs = [["POST", f"/users/{u}/tags", json.dumps({"top_k": 20})] for u in users]
        self.spec = {"host": "127.0.0.1", "port": port, "requests": reqs, "concurrency": concurrency,
                     "duration": chunk, "warmup": 0}
        self.chunks: list[dict] = []
        self.stop = threading.Event()
        self.log = log
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(self.spec, f)
        while not self.stop.is_set():
            t0 = time.time()
            out = subprocess.run([PY, "-m", "loadtest.loadgen", f.name], capture_output=True, text=True, cwd=ROOT)
            res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else \
                {"error": out.stderr[-500:]}
            self.chunks.append({"start": t0, "end": time.time(), **res})
            with self.log.open("a") as fh:
                fh.write(json.dumps(self.chunks[-1]) + "\n")

    def between(self, t0: float, t1: float) -> dict:
        """Requests and non-200 answers of the chunks that ended in [t0, t1)."""
        statuses: dict[str, int] = {}
        for c in self.chunks:
            if t0 <= c["end"] < t1:
                for k, v in (c.get("status") or {"loadgen-failed": 1}).items():
                    statuses[k] = statuses.get(k, 0) + v
        n = sum(statuses.values())
        bad = sum(v for k, v in statuses.items() if k != "200")
        return {"requests": n, "non_200": bad, "status": statuses}


# ---------------------------------------------------------------------------------- steps
def load_features(r, keys, days: Path, day: str, work: Path) -> int:
    """The feature store := the snapshot of the end of `day` (a dataset dir: meta.json + users.parquet)."""
    from model_export.feature_store import load_dataset_users
    d = work / f"store-{day}"
    d.mkdir(parents=True, exist_ok=True)
    for name, src in (("meta.json", days / "meta.json"), ("users.parquet", days / "snapshots" / f"day={day}" / "users.parquet")):
        if not (d / name).exists():
            (d / name).symlink_to(src.resolve())
    return load_dataset_users(d, r, keys=keys, progress=False).loaded


def ramp(r, keys, policy, look_s: float, limit_s: float) -> dict:
    """`mvke promote --auto` every look_s seconds until promoted or rolled back (or limit_s)."""
    from model_export.ramp import auto_promote
    from mvke.runtime.cycle_record import read_live
    t0, c0 = time.perf_counter(), time.process_time()
    steps, version = [], None
    while time.perf_counter() - t0 < limit_s:
        out = auto_promote(r, keys, policy)
        version = out.get("version", version)
        if out["decision"] != "hold":
            steps.append({"at_s": round(time.perf_counter() - t0, 1), "decision": out["decision"],
                          "percent": out.get("percent"), "to_percent": out.get("to_percent"),
                          "reasons": out.get("reasons"), "step": out.get("step")})
        if out["decision"] in ("promoted", "rolled back", "none"):
            break
        time.sleep(look_s)
    live = read_live(r, keys, version) if version else None
    return {"steps": steps, "decision": steps[-1]["decision"] if steps else "timed out",
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 2),
            "live": None if live is None else {**live.to_dict(), **live.means()}}


def tag_all(redis_url: str, users: Path, out: Path) -> dict:
    """`mvke tag-all --to-redis` of every user of the snapshot, as its own process (wall and CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-m", "mvke.cli", "tag-all", "--redis", redis_url, "--users", str(users), "--out",
                        str(out), "--to-redis", "--workers", "1", "--no-progress"], capture_output=True, text=True,
                       cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = {"wall_s": round(time.perf_counter() - t0, 1),
           "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1), "rc": p.returncode}
    if p.returncode == 0:
        summary = json.loads(p.stdout[p.stdout.index("{"):])
        doc.update(users=summary.get("users"), version=summary.get("model_version"))
    else:
        doc["error"] = p.stderr[-800:]
    return doc


def start_service(redis_url: str, port: int, share: float, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MVKE_SHADOW_SHARE": str(share), "MVKE_LIVE_FLUSH_S": "1", "MVKE_MODEL_POLL_S": "0.5",
           "MVKE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([PY, "-m", "mvke.cli", "serve", "--redis", redis_url, "--port", str(port), "--workers", "1"],
                         env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    import httpx
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"service not ready: see {log}")


def gate_entry(home: Path, day: str, res, injected: bool) -> dict:
    gate = json.loads((home / f"day={day}" / "gate.json").read_text())
    return {"day": day, "decision": res.decision, "injected_bad": injected, "reasons": res.reasons,
            "candidate_auc": {t: v["auc"] for t, v in gate["candidate"]["tasks"].items()},
            "active_auc": None if gate["active"] is None else {t: v["auc"] for t, v in gate["active"]["tasks"].items()},
            "active_version": gate["active_version"],
            "steps": {n: {"wall_s": s.get("wall_seconds"), "cpu_s": s.get("cpu_seconds_step")}
                      for n, s in res.state["steps"].items() if n != "active"}}


# ---------------------------------------------------------------------------------- the week
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work directory (cycle home, logs, results.json)")
    p.add_argument("--data", help="an existing days directory (default OUT/days, generated)")
    p.add_argument("--users", type=int, default=2000, help="initial users (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="the world's seed (default 1; the gate's defaults were "
                                                       "chosen on seed 0)")
    p.add_argument("--days", type=int, default=8, help="days in the world (default 8); cycles run for days 2..D")
    p.add_argument("--bad-day", type=int, default=5, help="the day (1-based) whose candidate trains on shuffled labels")
    p.add_argument("--window", type=int, default=3, help="training window in days (default 3)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per candidate (default 2)")
    p.add_argument("--warm-start", action="store_true", help="warm-start each candidate from the active checkpoint")
    p.add_argument("--policy", help="gate policy YAML (default: the documented defaults)")
    p.add_argument("--step-seconds", type=float, default=20, help="the trial's min_step_seconds (default 20)")
    p.add_argument("--step-answers", type=int, default=200, help="the trial's min_answers per step (default 200)")
    p.add_argument("--shadow-samples", type=int, default=30, help="the trial's min_shadow_samples (default 30)")
    p.add_argument("--shadow-share", type=float, default=0.05, help="MVKE_SHADOW_SHARE of the service (default 0.05)")
    p.add_argument("--concurrency", type=int, default=16, help="loadgen connections (default 16)")
    p.add_argument("--load-chunk", type=float, default=30, help="seconds per loadgen process (default 30)")
    p.add_argument("--port", type=int, default=8431)
    return p.parse_args()


def trial_policy(a: argparse.Namespace):
    """The gate policy (file or defaults) with the promotion times compressed to the trial's."""
    from dataclasses import replace

    from mvke.training.gate import load_policy
    policy = load_policy(a.policy)
    policy.promotion = replace(policy.promotion, min_step_seconds=a.step_seconds, min_answers=a.step_answers,
                               min_shadow_samples=a.shadow_samples)
    return policy


def main() -> None:
    a = parse_args()
    import yaml

    from model_export.cycle import CycleConfig, _categories, run_cycle
    from mvke.data.days import DaysConfig, DaysLayout, generate_days, parse_day, view
    from mvke.data.synthetic import SynthConfig
    from mvke.localredis import LocalRedis
    from mvke.runtime.keys import Keys
    from mvke.training.gate import score
    from mvke.training.trainer import load_checkpoint

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, home = Path(a.data or out / "days").resolve(), out / "cycle"
    start = parse_day("2026-01-01")
    if not (data / "meta.json").exists():
        generate_days(SynthConfig(users=a.users, seed=a.seed), DaysConfig(days=a.days), data)
    layout = DaysLayout(data)
    days = layout.days()
    policy = trial_policy(a)
    policy_file = out / "trial_policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False))
    rows, frozen, load, svc = [], None, None, None
    t_week = time.time()
    with LocalRedis() as srv:
        r, keys = srv.client(), Keys()
        load_features(r, keys, data, (start - timedelta(days=1)).isoformat(), out)   # the world's first state
        try:
            for k in range(2, a.days + 1):
                day = (start + timedelta(days=k - 1)).isoformat()
                prev = (start + timedelta(days=k - 2)).isoformat()
                t_day, load_day = time.time(), os.getloadavg()
                cfg = CycleConfig(data, day, home, window=a.window, warm_start=a.warm_start,
                                  train={"epochs": a.epochs, "threads": 2}, redis_url=srv.url,
                                  shuffle_labels=(k == a.bad_day), policy=policy_file)
                res = run_cycle(cfg, say=lambda m: print(m, flush=True))
                entry = gate_entry(home, day, res, k == a.bad_day)
                # after the publish (whose store check compares the candidate with the snapshot it trained
                # on): the store moves on to the end of yesterday, what the day's requests are answered from
                entry["feature_store_users"] = load_features(r, keys, data, prev, out)
                if svc is None and res.decision == "activated":     # the first model: serve it, start the load
                    svc = start_service(srv.url, a.port, a.shadow_share, out / "service.log")
                    import pyarrow.parquet as pq
                    ids = pq.read_table(data / "snapshots" / f"day={prev}" / "users.parquet",
                                        columns=["user_id"])["user_id"].to_pylist()
                    load = Load(a.port, [str(u) for u in ids], a.concurrency, a.load_chunk, out / "load.jsonl")
                    load.thread.start()
                if res.decision == "published-canary":
                    rp = ramp(r, keys, policy, 3.0, 900)
                    entry["ramp"] = rp
                    entry["steps"]["ramp"] = {"wall_s": rp["wall_s"], "cpu_s": rp["cpu_s"]}
                    entry["decision"] = rp["decision"]
                if entry["decision"] in ("promoted", "activated"):
                    ta = tag_all(srv.url, data / "snapshots" / f"day={prev}" / "users.parquet", out / "tagall" / day)
                    entry["tag_all"] = ta
                    entry["steps"]["tag_all"] = {"wall_s": ta["wall_s"], "cpu_s": ta["cpu_s"]}
                if frozen is None and res.decision != "rejected":
                    frozen = res.state["steps"]["export"]["version"]
                active_now = r.get(keys.active)
                entry["active_after"] = active_now.decode() if active_now else None
                entry["day_wall_s"] = round(time.time() - t_day, 1)
                entry["loadavg_at_start"] = [round(x, 2) for x in load_day]
                rows.append(entry)
                print(json.dumps({x: entry.get(x) for x in ("day", "decision", "candidate_auc", "active_auc",
                                                             "day_wall_s")}), flush=True)
                (out / "days_partial.json").write_text(json.dumps(rows, indent=1))
                entry["_t"] = (t_day, time.time())
        finally:
            if load is not None:
                load.stop.set()
                load.thread.join(a.load_chunk + 30)
            if svc is not None:
                svc.terminate()
                svc.wait(30)
        for entry in rows:
            entry["load"] = load.between(*entry.pop("_t")) if load is not None else None
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
           "load_total": load.between(t_week, time.time() + 1) if load is not None else None,
           "setup": {"users": a.users, "seed": a.seed, "days": a.days, "window": a.window, "epochs": a.epochs,
                     "warm_start": a.warm_start, "bad_day": a.bad_day, "policy": policy.to_dict(),
                     "service": {"workers": 1, "shadow_share": a.shadow_share, "loadgen_concurrency": a.concurrency,
                                 "request": "POST /users/{id}/tags top_k 20, every user of the first snapshot"}},
           "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                       "week_wall_s": round(time.time() - t_week, 1)}}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["value_of_the_loop"], indent=1))


# ---------------------------------------------------------------------------------- the report
def _auc(d: dict | None) -> str:
    return "-" if not d else " / ".join(f"{d[t]:.3f}" for t in ("interest", "intention"))


def _ramp_text(entry: dict) -> str:
    rp = entry.get("ramp")
    if not rp:
        return "-"
    return ", ".join(f"{s['decision']} {s['percent']:g}%" + (f"->{s['to_percent']:g}%" if s.get("to_percent") else "")
                     + f" @{s['at_s']:g}s" for s in rp["steps"])


def _shadow(entry: dict) -> tuple[str, str, str]:
    live = (entry.get("ramp") or {}).get("live")
    if not live or not live.get("shadow_n"):
        return "-", "-", "-"
    return (f"{live['jaccard_at_20']:.3f} (n={live['shadow_n']})", f"{live['score_shift']:.3f}",
            f"{live['canary_seconds'] * 1000:.2f}")


def _step_text(entry: dict, name: str) -> str:
    s = entry["steps"].get(name)
    return "-" if not s or s.get("wall_s") is None else f"{s['wall_s']:.0f} / {s['cpu_s']:.0f}"


def _reason(entry: dict) -> str:
    reasons = list(entry.get("reasons") or []) + list((entry.get("ramp") or {}).get("steps", [{}])[-1].get("reasons")
                                                      or [])
    return "; ".join(r.split(" (rule")[0] for r in reasons[:3]) + (" ..." if len(reasons) > 3 else "") or "-"


def report(doc: dict) -> str:
    """results.md from results.json: the per-day table, step times, the value of the loop."""
    lines = ["| day | decision | reason | active AUC (int / intent) | candidate AUC | ramp (step @ s since canary) "
             "| shadow Jaccard@20 | shift | canary ms | requests | non-200 |", "|---" * 11 + "|"]
    for e in doc["days"]:
        jac, shift, ms = _shadow(e)
        ld = e.get("load") or {}
        lines.append(f"| {e['day']}{' (shuffled labels)' if e['injected_bad'] else ''} | {e['decision']} | "
                     f"{_reason(e)} | {_auc(e['active_auc'])} | {_auc(e['candidate_auc'])} | {_ramp_text(e)} | "
                     f"{jac} | {shift} | {ms} | {ld.get('requests', '-')} | {ld.get('non_200', '-')} |")
    steps = ("train", "gate", "export", "publish", "ramp", "tag_all")
    lines += ["", "Wall / CPU seconds per step (CPU: this process for the cycle's steps and the ramp, the child "
                  "process for tag-all):", "",
              "| day | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {e['day']} | " + " | ".join(_step_text(e, s) for s in steps) + " |" for e in doc["days"]]
    v = doc["value_of_the_loop"]
    lines += ["", f"Value of the loop on {v['day']} (same rows): the model the loop ends with "
                  f"({v['loop']['version']}) {_auc(v['loop']['auc'])}, the model frozen after the first cycle "
                  f"({v['frozen_after_first_cycle']['version']}) {_auc(v['frozen_after_first_cycle']['auc'])}."]
    return "\n".join(lines) + "\n"


def spread(home: Path, big_slice: int = 2000) -> dict:
    """The gate's figures of every gated day of a cycle home (a calibration run: every candidate promoted):
    per check and task, per day the value (absolute checks) or the loss against the active (change
    checks); slices as the largest loss among small and among large (>= big_slice rows) slices."""
    out: dict[str, dict] = {}
    for f in sorted(home.glob("day=*/gate.json")):
        g = json.loads(f.read_text())
        if g["active"] is None:
            continue
        day = f.parent.name[4:]
        for c in g["checks"]:
            entry = out.setdefault(f"{c['check']}[{c['task']}]", {})
            if c["check"] == "slice_auc_max_drop":
                size = "n>=%d" % big_slice if g["candidate"]["slices"][c["slice"]]["n"] >= big_slice else "n<%d" % big_slice
                loss = round(c["active"] - c["value"], 4)
                entry.setdefault(day, {})[size] = max(entry.get(day, {}).get(size, -1.0), loss)
            else:
                entry[day] = round(c["value"] if c["active"] is None else c["active"] - c["value"], 4)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report-only":
        print(report(json.loads(Path(sys.argv[2]).read_text())))
    elif len(sys.argv) == 3 and sys.argv[1] == "--spread":
        print(json.dumps(spread(Path(sys.argv[2])), indent=1))
    else:
        main()
