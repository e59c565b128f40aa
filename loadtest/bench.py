"""`python -m loadtest.bench [--quick] [--soak 600]`: the tag service side by side with its ceilings.

One run, one load generator (loadtest/loadgen.py: asyncio + uvloop, raw HTTP/1.1
keep-alive sockets, pre-rendered requests, in its own process), one table:

  a. in-process ceiling: feature lookup -> encode -> ONNX -> scores -> top-k with
     mvke.runtime (the code the service runs, no HTTP, no event loop), users/s at
     batch 1 and 256, and the cost of each step at batch 1, 16 and 256;
  b. the service over HTTP (`mvke serve`, default settings) at concurrency 1, 32, 128, 256:
     QPS, p50, p99, errors by status;
  c. an empty FastAPI POST endpoint (loadtest/empty_app.py) with the service's server
     settings, and with 2 uvicorn workers: the HTTP ceiling;
  d. the naive reference (loadtest/naive_app.py: PyTorch forward over all tags per request);
  e. nomtl served by the same service (vs mvke-mt);
  f. memory: service RSS per worker; with --soak S, its growth over S seconds at 70% of peak QPS;
  g. with --baseline DIR (a checkout of another commit, e.g. `git worktree add /tmp/base <rev>`):
     that commit's service and this tree's, same Redis, same requests, at c=1 and c=32 in
     --rounds interleaved rounds (the order alternates per round), medians and ratios.

Data: the default synthetic dataset, mvke-mt and nomtl trained 1 epoch each, exported,
published to private redis-servers (one per model) with every user's features loaded, all
by `mvke pipeline` (built once under --work, default /tmp/lt; later runs only publish).
The service is queried over HTTP only; the settings it runs with come from its GET /model.
The table and the machine description go to docs/results/performance.md between the
`bench` markers (text outside them is kept) and to a JSON file beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from loadtest.harness import ROOT, Server, make_requests, pipeline, run_load, start_redis
from mvke.runtime.system import cpu_model, loadavg

HERE = Path(__file__).resolve().parent


# ---- machine and data ------------------------------------------------------------------
def machine() -> dict:
    model = cpu_model()
    import fastapi
    import numpy
    import onnxruntime
    import uvicorn
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__, "kernel": platform.release()}


def ensure_data(work: Path, log) -> dict[str, Path]:
    """Dataset, checkpoints and bundles of mvke-mt and nomtl under `work` (`mvke pipeline`, built once)."""
    paths: dict[str, Path] = {}
    for model, tag in (("mvke-mt", "mvke"), ("nomtl", "nomtl")):
        log(f"mvke pipeline: {model} (1 epoch) under {work} (steps whose output exists are skipped)")
        done = pipeline(work, model, log=Path(work) / f"pipeline_{tag}.log")
        paths["data"], paths[f"ck_{tag}"], paths[f"bundle_{tag}"] = (Path(done[k]) for k in
                                                                       ("data", "checkpoint", "bundle"))
    return paths


def serve_dataset(redis_url: str, work: Path, model: str) -> None:
    """Publish `model` and load the users into a (private) Redis: the pipeline's last two steps."""
    pipeline(work, model, redis_url, log=Path(work) / "pipeline_publish.log")


def dataset_user_ids(data: Path) -> list[str]:
    import pyarrow.parquet as pq
    return [str(u) for u in pq.read_table(data / "users.parquet", columns=["user_id"])["user_id"].to_pylist()]


def serving_settings(server: Server) -> dict:
    """The settings a running service reports (GET /model)."""
    import httpx
    return httpx.get(server.url + "/model", timeout=10).json()["serving"]


# ---- a. in-process ceiling ----------------------------------------------------------------
STEPS = ("fetch", "encode", "tower", "score", "rank")


def inprocess(redis_url: str, user_ids: list[str], batch: int, seconds: float, top_k: int = 20) -> dict:
    """users/s of fetch -> encode -> tower -> score -> rank at one batch size, with mvke.runtime (the
    service's code without HTTP or the event loop), and microseconds per user of each step."""
    import redis

    from mvke.runtime.keys import Keys
    from mvke.runtime.model import build_model
    from mvke.runtime.scoring import rank
    from mvke.runtime.system import limit_blas_threads
    from mvke.runtime.versions import active_version, read_version
    keys = Keys()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    models = redis.Redis.from_url(redis_url)
    model = build_model(*read_version(models, keys, active_version(models, keys)), "cpu", 1)
    limit_blas_threads(1)                                      # as the service does
    tags, sides = model.tags, model.sides.values()
    spent = dict.fromkeys(STEPS, 0.0)
    i = n = 0
    lat = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or n == 0:
        ids = [user_ids[(i + j) % len(user_ids)] for j in range(batch)]
        i += batch
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for uid in ids:
            pipe.hgetall(keys.user(uid))
        rows = pipe.execute()
        t1 = time.perf_counter()
        enc = model.schema.encode(rows)
        t2 = time.perf_counter()
        values = model.run_tower(enc.cat_ids, enc.multi_ids)
        t3 = time.perf_counter()
        ranked = rank(values, sides, top_k)
        t4 = time.perf_counter()
        answers = [{task: list(zip(map(tags.__getitem__, ix), sc)) for task, (ix, sc) in
                    ((t, (x.tag_index[u].tolist(), x.scores[u].tolist())) for t, x in ranked.items())}
                   for u in range(batch)]
        t5 = time.perf_counter()
        assert len(answers) == batch and not enc.errors
        for step, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            spent[step] += dt
        lat.append(t5 - t0)
        n += batch
    r.close()
    models.close()
    total = sum(lat)
    return {"users_per_s": n / total, "ms_per_call_p50": statistics.median(lat) * 1e3, "us_per_user": total / n * 1e6,
            "steps_us_per_user": {k: v / n * 1e6 for k, v in spent.items()}}


# ---- the run ------------------------------------------------------------------------------
class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.rows: list[dict] = []
        self.dur = a.duration or (3.0 if a.quick else 12.0)
        self.warm = 1.0 if a.quick else 2.0
        self.logs = Path(a.work) / "bench-logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)

    def load(self, server: Server, row: str, c: int, requests: list, extra: dict | None = None,
             duration: float | None = None, grace: float = 5.0) -> dict:
        res = run_load(server.port, requests, c, duration or self.dur, self.warm, grace=grace)
        res.update(row=row, c=c, alive=server.alive(), **(extra or {}))
        self.rows.append(res)
        self.log(f"{row:34} c={c:<4} {res['qps']:9.0f} QPS  p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:8.2f} ms"
                 f"  status {res['status']}")
        return res

    def run(self) -> dict:
        a = self.a
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load_before = loadavg()
        self.log(f"machine {machine()}")
        paths = ensure_data(Path(a.work), self.log)
        ids = dataset_user_ids(paths["data"])
        reqs = make_requests(ids, 8192, zipf=0.0, topk_mix="20:1", seed=1)
        redis_mt, redis_nomtl = start_redis(), start_redis()
        servers: list[Server] = []
        ab = None
        try:
            serve_dataset(redis_mt.url, Path(a.work), "mvke-mt")
            serve_dataset(redis_nomtl.url, Path(a.work), "nomtl")
            self.log("published both models and loaded the feature store")

            # b. the service (mvke-mt), default settings, then with the other worker count
            svc = Server.service(redis_mt.url, workers=a.workers, log=self.logs / "service.log").start()
            servers.append(svc)
            info = serving_settings(svc)
            workers = info["workers"]
            rss_idle = svc.rss_mb()
            for c in (1, 32, 128, 256):
                self.load(svc, f"service mvke-mt ({workers}w)", c, reqs)
            rss_loaded = svc.rss_mb()
            peak = max(r["ok_qps"] for r in self.rows if r["row"].startswith("service mvke-mt"))
            soak = self.soak(svc, reqs, peak) if a.soak else None
            svc.stop()
            other = 2 if workers == 1 else 1
            svc2 = Server.service(redis_mt.url, workers=other, log=self.logs / "service.log").start()
            servers.append(svc2)
            for c in (1, 32, 128, 256):
                self.load(svc2, f"service mvke-mt ({other}w)", c, reqs)
            svc2.stop()

            # e. nomtl in the same service
            svc3 = Server.service(redis_nomtl.url, workers=workers, log=self.logs / "service.log").start()
            servers.append(svc3)
            for c in (1, 32):
                self.load(svc3, f"service nomtl ({workers}w)", c, reqs)
            svc3.stop()

            # c. the HTTP ceiling
            for w in sorted({1, 2, workers}):
                empty = Server.asgi("loadtest.empty_app:app", workers=w, log=self.logs / "empty.log").start()
                servers.append(empty)
                for c in (1, 32):
                    self.load(empty, f"empty FastAPI ({w}w)", c, reqs)
                empty.stop()

            # d. the naive reference
            naive = Server.asgi("loadtest.naive_app:app", workers=workers, log=self.logs / "naive.log",
                                env={"REDIS_URL": redis_mt.url, "MVKE_NAIVE_CKPT": str(paths["ck_mvke"])}).start()
            servers.append(naive)
            for c in (1, 32):
                self.load(naive, f"naive PyTorch ({workers}w)", c, reqs, duration=max(self.dur, 5.0), grace=60.0)
            naive.stop()

            # g. this tree against another commit, interleaved
            if a.baseline:
                ab = self.ab(redis_mt.url, reqs, workers)

            # a. in-process ceiling (servers down: the CPU is its own)
            self.log("in-process ceiling")
            measured = {b: inprocess(redis_mt.url, ids, b, 2.0 if a.quick else 5.0) for b in (1, 16, 256)}
            ceiling = {b: measured[b] for b in (1, 256)}
            steps = {b: m["steps_us_per_user"] for b, m in measured.items()}
        finally:
            for s in servers:
                s.stop()
            redis_mt.stop()
            redis_nomtl.stop()
        return {"started": started, "machine": machine(), "load_before": load_before, "load_after": loadavg(),
                "settings": info, "rows": self.rows, "inprocess": ceiling, "steps": steps,
                "rss_mb": {"idle": rss_idle, "after_load": rss_loaded}, "soak": soak, "ab": ab,
                "duration_s": self.dur, "warmup_s": self.warm, "quick": a.quick}

    def ab(self, redis_url: str, reqs: list, workers: int) -> dict:
        """The service of --baseline (another checkout) and of this tree, both up on the same Redis, loaded in
        turn at c=1 and c=32 for --rounds rounds (who goes first alternates): medians per side."""
        a = self.a
        sides = {"baseline": Path(a.baseline).resolve(), "this tree": ROOT}
        revs = {name: git_rev(root) for name, root in sides.items()}
        self.log(f"A/B: baseline {revs['baseline']} ({sides['baseline']}) vs this tree {revs['this tree']}, "
                 f"{a.rounds} rounds")
        servers = {name: Server.service(redis_url, workers=workers, root=root,
                                        log=self.logs / f"ab-{name.replace(' ', '-')}.log").start()
                   for name, root in sides.items()}
        rows = []
        try:
            for rnd in range(a.rounds):
                for name in (list(sides) if rnd % 2 == 0 else list(sides)[::-1]):
                    for c in (1, 32):
                        res = run_load(servers[name].port, reqs, c, self.dur, self.warm)
                        res.update(side=name, c=c, round=rnd, load=loadavg())
                        rows.append(res)
                        self.log(f"A/B round {rnd} {name:10} c={c:<3} {res['qps']:8.0f} QPS p50 {res['p50_ms']:6.2f} ms"
                                 f" p99 {res['p99_ms']:7.2f} ms status {res['status']}")
        finally:
            for srv in servers.values():
                srv.stop()
        med = {name: {"c32_qps": statistics.median(r["qps"] for r in rows if r["side"] == name and r["c"] == 32),
                      "c1_p50_ms": statistics.median(r["p50_ms"] for r in rows if r["side"] == name and r["c"] == 1)}
               for name in sides}
        ratio = {"c32_qps": med["this tree"]["c32_qps"] / med["baseline"]["c32_qps"],
                 "c1_p50_ms": med["this tree"]["c1_p50_ms"] / med["baseline"]["c1_p50_ms"]}
        return {"revs": revs, "workers": workers, "rounds": a.rounds, "rows": rows, "median": med, "ratio": ratio}

    def soak(self, svc: Server, reqs: list, peak: float) -> dict:
        """Paced load at 70% of `peak` for --soak seconds; RSS of every worker sampled every 10 s."""
        rate = 0.7 * peak
        self.log(f"soak: {self.a.soak:.0f}s at {rate:.0f} req/s (70% of peak {peak:.0f})")
        samples: list[tuple[float, list[float]]] = []
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample():
            while not stop.is_set():
                samples.append((round(time.perf_counter() - t0, 1), [round(x, 1) for x in svc.rss_mb()]))
                stop.wait(10.0)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = run_load(svc.port, reqs, 32, self.a.soak, 1.0, rate=rate, timeline=True)
        finally:
            stop.set()
            th.join(15)
        samples.append((round(time.perf_counter() - t0, 1), [round(x, 1) for x in svc.rss_mb()]))
        first = samples[min(1, len(samples) - 1)][1]   # after 10 s (warm), not the idle value
        last = samples[-1][1]
        res.pop("timeline", None)
        return {"seconds": self.a.soak, "rate": rate, "result": res, "rss_samples": samples,
                "rss_first_mb": first, "rss_last_mb": last,
                "growth_mb": [round(b - a_, 1) for a_, b in zip(first, last)], "alive": svc.alive()}


def git_rev(root: Path) -> str:
    """Short commit of a checkout, marked when its tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")


# ---- report ---------------------------------------------------------------------------
def _row(rows: list[dict], name: str, c: int) -> dict | None:
    return next((r for r in rows if r["row"] == name and r["c"] == c), None)


def fmt_status(st: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in st.items() if k != "200") or "-"


def report(res: dict, targets: dict) -> tuple[str, list[dict]]:
    rows, s = res["rows"], res["settings"]
    w = s["workers"]
    svc_name, nomtl_name = f"service mvke-mt ({w}w)", f"service nomtl ({w}w)"
    empty2 = _row(rows, "empty FastAPI (2w)", 32)
    svc32 = _row(rows, svc_name, 32)
    lines = [
        f"Run {res['started']}{' (--quick)' if res['quick'] else ''}: {res['machine']['nproc']} CPUs "
        f"({res['machine']['cpu']}), load average before {res['load_before']}, after {res['load_after']} "
        f"(1, 5, 15 min). Python {res['machine']['python']}, onnxruntime {res['machine']['onnxruntime']}, "
        f"FastAPI {res['machine']['fastapi']}, uvicorn {res['machine']['uvicorn']}.",
        "",
        f"Load generator for every HTTP row: loadtest/loadgen.py (asyncio + uvloop, raw keep-alive HTTP/1.1 "
        f"sockets, closed loop: each of c connections sends its next request when the answer arrives), one "
        f"process on the same {res['machine']['nproc']} cores as the server; {res['warmup_s']:g} s warm-up, "
        f"then {res['duration_s']:g} s measured per row. Requests: POST /users/<id>/tags with body "
        "{\"top_k\": 20}, users drawn uniformly from the 20,000 in the feature store, 2 tasks x 1,780 tags.",
        "",
        f"Service settings (the defaults): {s['workers']} uvicorn worker(s), batching {s['batching']}, "
        f"max_batch_size {s['max_batch_size']}, max_wait_ms {s['max_wait_ms']}, ORT intra-op threads "
        f"{s['ort_threads']}, Redis pool {s['redis_pool_size']}, compute offload from batch "
        f"{s['compute_offload_min_batch']}, fast path {s['fast_path']}.",
        "",
        "| row | c | QPS | p50 ms | p99 ms | non-200 | ratio |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for b, v in res["inprocess"].items():
        lines.append(f"| a. in-process ceiling, batch {b} (users/s) | - | {v['users_per_s']:,.0f} | "
                     f"{v['ms_per_call_p50']:.2f} (per call) | - | - | "
                     f"{svc32['qps'] / v['users_per_s']:.2f} (service c32 / this) |" if svc32 else "|")
    for r in rows:
        ratio = ""
        if r["row"].startswith("service mvke-mt") and empty2 and r["c"] == 32:
            ratio = f"{r['qps'] / empty2['qps']:.2f} of empty FastAPI 2w"
        elif r["row"] == nomtl_name:
            mt = _row(rows, svc_name, r["c"])
            ratio = f"mvke-mt / nomtl = {mt['qps'] / r['qps']:.2f}" if mt else ""
        elif r["row"].startswith("naive") and svc32:
            mt = _row(rows, svc_name, r["c"])
            ratio = f"service / naive = {mt['qps'] / r['qps']:.1f}x" if mt else ""
        label = {"service": "b.", "empty": "c.", "naive": "d."}.get(r["row"].split()[0], "")
        if "nomtl" in r["row"]:
            label = "e."
        dead = "" if r.get("alive", True) else " (server died)"
        lines.append(f"| {label} {r['row']}{dead} | {r['c']} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {fmt_status(r['status'])} | {ratio} |")
    rss = res["rss_mb"]
    lines += ["", f"f. Service RSS per worker: idle {', '.join(f'{x:.0f}' for x in rss['idle'])} MB, after the "
                  f"load rows {', '.join(f'{x:.0f}' for x in rss['after_load'])} MB."]
    if res.get("soak"):
        sk = res["soak"]
        lines.append(f"Soak: {sk['seconds']:.0f} s at {sk['rate']:.0f} req/s (70% of peak): achieved "
                     f"{sk['result']['qps']:.0f} QPS, p99 {sk['result']['p99_ms']:.2f} ms, non-200 "
                     f"{fmt_status(sk['result']['status'])}; RSS after 10 s {sk['rss_first_mb']} MB, at the end "
                     f"{sk['rss_last_mb']} MB (growth {sk['growth_mb']} MB); server alive: {sk['alive']}.")
    else:
        lines.append("Soak: not run in this invocation (`--soak 600`, or `--soak-only --soak 600`: "
                     "see the soak section).")
    lines += ["", "Hot-path steps in process (us per user; mvke.runtime's fetch -> encode -> tower -> score -> "
                  "rank, the steps the service times in mvke_step_seconds):", "",
              "| batch | " + " | ".join(["fetch", "encode", "tower", "score", "rank"]) + " |", "|---:|---:|---:|---:|---:|---:|"]
    for b, st in res["steps"].items():
        lines.append(f"| {b} | " + " | ".join(f"{st.get(k, float('nan')):.1f}" for k in
                                              ("fetch", "encode", "tower", "score", "rank")) + " |")
    if res.get("ab"):
        lines += ["", *ab_table(res["ab"], res["duration_s"])]
    checks = evaluate(res, targets)
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['measured']} | {'yes' if c['ok'] else 'NO'} |")
    if not all(c["ok"] for c in checks):
        from loadtest.run import targets_note
        lines += ["", targets_note("loadtest/targets.yaml", "bench")]
    return "\n".join(lines), checks


def ab_table(ab: dict, duration: float) -> list[str]:
    """Section g: baseline commit vs this tree, round by round, then medians and ratios."""
    revs = ab["revs"]
    lines = [f"g. Baseline {revs['baseline']} against this tree {revs['this tree']}: both services up on the same "
             f"Redis ({ab['workers']} worker(s) each), loaded in turn, {ab['rounds']} rounds, who goes first "
             f"alternating; {duration:g} s per row. Load average at each row in the last column.", "",
             "| round | side | c | QPS | p50 ms | p99 ms | non-200 | load |", "|---:|---|---:|---:|---:|---:|---|---|"]
    for r in ab["rows"]:
        lines.append(f"| {r['round']} | {r['side']} | {r['c']} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {fmt_status(r['status'])} | {r['load']} |")
    m, q = ab["median"], ab["ratio"]
    lines += ["", "| median | baseline | this tree | this tree / baseline |", "|---|---:|---:|---:|",
              f"| QPS at c=32 | {m['baseline']['c32_qps']:,.0f} | {m['this tree']['c32_qps']:,.0f} | "
              f"{q['c32_qps']:.3f} |",
              f"| p50 ms at c=1 | {m['baseline']['c1_p50_ms']:.3f} | {m['this tree']['c1_p50_ms']:.3f} | "
              f"{q['c1_p50_ms']:.3f} |"]
    return lines


def evaluate(res: dict, t: dict) -> list[dict]:
    rows, w = res["rows"], res["settings"]["workers"]
    svc = lambda c: _row(rows, f"service mvke-mt ({w}w)", c)  # noqa: E731
    out = []
    r32, r1, r256 = svc(32), svc(1), svc(256)
    errs = lambda r: sum(v for k, v in r["status"].items() if k != "200")  # noqa: E731
    if r32:
        ok = r32["qps"] >= t["c32_min_qps"] and r32["p99_ms"] <= t["c32_max_p99_ms"] and errs(r32) == 0
        out.append({"target": f">= {t['c32_min_qps']} QPS at c32, p99 <= {t['c32_max_p99_ms']} ms, no errors",
                    "measured": f"{r32['qps']:,.0f} QPS, p99 {r32['p99_ms']:.1f} ms, {errs(r32)} errors", "ok": ok})
    if r1:
        out.append({"target": f"p50 <= {t['c1_max_p50_ms']} ms at c1", "measured": f"{r1['p50_ms']:.2f} ms",
                    "ok": r1["p50_ms"] <= t["c1_max_p50_ms"]})
    e2 = _row(rows, "empty FastAPI (2w)", 32)
    if r32 and e2:
        ratio = r32["qps"] / e2["qps"]
        out.append({"target": f"service >= {t['min_ratio_vs_empty_fastapi_2_workers']:.0%} of empty FastAPI "
                              "(2 workers) at c32", "measured": f"{ratio:.0%} ({r32['qps']:,.0f} / {e2['qps']:,.0f})",
                    "ok": ratio >= t["min_ratio_vs_empty_fastapi_2_workers"]})
    n32 = _row(rows, f"service nomtl ({w}w)", 32)
    if r32 and n32:
        ratio = r32["qps"] / n32["qps"]
        out.append({"target": f"mvke-mt >= {t['min_ratio_mt_vs_nomtl']:.0%} of nomtl QPS (c32)",
                    "measured": f"{ratio:.0%} ({r32['qps']:,.0f} / {n32['qps']:,.0f})",
                    "ok": ratio >= t["min_ratio_mt_vs_nomtl"]})
    if r256:
        five = {k: v for k, v in r256["status"].items() if k.isdigit() and k.startswith("5") and k != "503"}
        other = {k: v for k, v in r256["status"].items() if not k.isdigit()}
        ok = not five and not other and r256["p99_ms"] <= t["c256_max_p99_ms"] and r256["alive"]
        out.append({"target": f"c256: no 5xx (fast 503 allowed), p99 <= {t['c256_max_p99_ms']} ms, stays up",
                    "measured": f"p99 {r256['p99_ms']:.1f} ms, 503s {r256['status'].get('503', 0)}, other 5xx "
                                f"{five or 0}, connection errors {other or 0}, alive {r256['alive']}", "ok": ok})
    rss = res["rss_mb"]["after_load"]
    if rss:
        out.append({"target": f"RSS <= {t['max_rss_mb_per_worker']} MB per worker",
                    "measured": f"{max(rss):.0f} MB (max over workers)", "ok": max(rss) <= t["max_rss_mb_per_worker"]})
    if res.get("soak"):
        g = max(res["soak"]["growth_mb"] or [0])
        out.append({"target": "no RSS growth in the soak", "measured": f"{g:+.1f} MB over {res['soak']['seconds']:.0f} s",
                    "ok": g <= 10.0})
    return out


def write_markdown(path: Path, body: str, marker: str = "bench") -> None:
    """Replace the text between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` (or append it)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    path.parent.mkdir(parents=True, exist_ok=True)
    block = f"{begin}\n{body}\n{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Performance of the tag service\n\n" + block + "\n"
    path.write_text(text)


def soak_only(a: argparse.Namespace) -> int:
    """Service alone: its peak at c32 with a mixed workload, then the soak at 70% of it."""
    b = Bench(a)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg()
    paths = ensure_data(Path(a.work), b.log)
    ids = dataset_user_ids(paths["data"])
    redis = start_redis()
    try:
        serve_dataset(redis.url, Path(a.work), "mvke-mt")
        from loadtest.harness import sample_features
        mix = make_requests(ids, 8192, zipf=1.0, topk_mix="5:0.2,20:0.6,50:0.2", new_share=0.05,
                            feature_examples=sample_features(redis.url, ids, 50), seed=2)
        with Server.service(redis.url, workers=a.workers, log=b.logs / "soak-service.log") as svc:
            workers = serving_settings(svc)["workers"]
            peak = b.load(svc, f"service mvke-mt ({workers}w), mixed", 32, mix)["ok_qps"]
            soak = b.soak(svc, mix, peak)
    finally:
        redis.stop()
    r = soak["result"]
    text = (f"Soak {started}: `python -m loadtest.bench --soak-only --soak {a.soak:g}`, {workers} worker(s), load "
            f"average before {load_before}, after {loadavg()}. Mixed workload (users Zipf 1.0, top_k 5/20/50 at "
            f"20/60/20%, 5% new users with body features). Peak at c32 {peak:,.0f} QPS; soak paced at "
            f"{soak['rate']:,.0f} req/s (70%) on 32 connections for {soak['seconds']:.0f} s: achieved {r['qps']:,.0f}"
            f" QPS, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, non-200 {fmt_status(r['status'])}.\n\n"
            f"RSS per worker (MB) after 10 s {soak['rss_first_mb']}, at the end {soak['rss_last_mb']}: growth "
            f"{soak['growth_mb']} MB; server alive at the end: {soak['alive']}.\n\n"
            "| t (s) | RSS per worker (MB) |\n|---:|---|\n"
            + "\n".join(f"| {t:g} | {', '.join(f'{x:.1f}' for x in v)} |" for t, v in soak["rss_samples"]))
    print("\n" + text)
    out = Path(a.out)
    write_markdown(out, text, marker="soak")
    out.with_name("soak.json").write_text(json.dumps({"started": started, "peak": peak, **soak}, indent=1))
    return 0


def catalogue_curve(a: argparse.Namespace) -> int:
    from loadtest import catalogue
    b = Bench(a)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), loadavg()
    work = Path(a.work)
    b.log(f"mvke pipeline: mvke-mt (1 epoch) under {work} (steps whose output exists are skipped)")
    done = pipeline(work, "mvke-mt", log=work / "pipeline_mvke.log")
    workers = a.workers or 1
    res = catalogue.run(a.tags, work, Path(done["checkpoint"]), Path(done["data"]), b.dur, workers, a.rounds, b.log)
    args = f"--tags {','.join(map(str, a.tags))}" + (" --quick" if a.quick else "") + \
        (f" --duration {a.duration:g}" if a.duration else "") + f" --rounds {a.rounds}"
    text = catalogue.report(res, machine(), load_before, loadavg(), started, args, workers)
    print("\n" + text)
    out = Path(a.out).with_name("large_catalogues.md")
    write_markdown(out, text, marker="catalogue")
    out.with_suffix(".json").write_text(json.dumps({"started": started, "machine": machine(), **res}, indent=1,
                                                   default=str))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per row instead of 12 s (a smoke run)")
    p.add_argument("--duration", type=float, help="seconds measured per row (overrides --quick)")
    p.add_argument("--soak", type=float, default=0.0, help="also soak the service this many seconds at 70%% of peak")
    p.add_argument("--soak-only", action="store_true", help="only the soak (service alone; its own section)")
    p.add_argument("--workers", type=int, help="uvicorn workers of the service (default: the service's default)")
    p.add_argument("--baseline", help="a checkout of another commit: its service against this tree's (section g)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the --baseline comparison "
                                                            "(with --tags: of the c=1 table)")
    p.add_argument("--work", default="/tmp/lt", help="dataset, checkpoints and bundles (built when missing)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "performance.md"))
    p.add_argument("--targets", default=str(HERE / "targets.yaml"))
    p.add_argument("--tags", type=lambda v: [int(x) for x in v.split(",")],
                   help="catalogue-size curve instead (e.g. 1780,20000,100000,1000000): exact vs ANN per size, "
                        "the c=1 before/after table (loadtest/catalogue.py); written to large_catalogues.md")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.tags:
        return catalogue_curve(a)
    if a.soak_only:
        if not a.soak:
            raise SystemExit("--soak-only needs --soak SECONDS")
        return soak_only(a)
    res = Bench(a).run()
    targets = yaml.safe_load(Path(a.targets).read_text())["bench"]
    text, checks = report(res, targets)
    res["checks"] = checks
    print("\n" + text)
    out = Path(a.out)
    write_markdown(out, text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
