"""`python -m loadtest.run --url URL --users N --duration 60s`: a bounded headless locust run.

Writes into --out (default loadtest/out/<timestamp>):
    locust_stats.csv, locust_stats_history.csv, locust_failures.csv, ...   (locust's CSVs)
    report.html                                                           (locust's HTML report)
    timeline.png                                                          (throughput + latency over time)
    summary.json                                                          (what is printed, machine-readable)
and prints achieved QPS, p50/p95/p99, error rate and PASS/FAIL per target of
loadtest/targets.yaml (section `locust`, or --profile). Exit status 0 on PASS, 1 on FAIL,
2 when locust itself failed.

The scenario (users, skew, top_k mix, new users with body features) is
loadtest/locustfile.py; its knobs are flags here. On a 2-core machine one
locust process saturates a core well below the service's capacity; --processes
forks more locust workers, and the summary reports locust's own CPU use so a
client-bound run is visible (loadtest/bench.py uses a much lighter client).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_TARGETS = HERE / "targets.yaml"


def parse_duration(text: str) -> float:
    """'60s', '2m', '1h', '90', '1m30s' -> seconds."""
    text = str(text).strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    total, num = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        else:
            raise ValueError(f"bad duration {text!r} (use e.g. 60s, 2m, 1m30s)")
    if num:
        total += float(num)
    return total


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_summary(prefix: Path, seconds: float) -> dict:
    """The Aggregated row of locust's stats CSV -> qps, percentiles (ms), errors."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    agg = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if agg is None:
        raise RuntimeError(f"no Aggregated row in {prefix}_stats.csv")
    n, fails = int(agg["Request Count"]), int(agg["Failure Count"])
    by_name = {r["Name"]: int(r["Request Count"]) for r in rows if r.get("Name") != "Aggregated"}
    status: dict[str, int] = {}
    fpath = Path(f"{prefix}_failures.csv")
    if fpath.exists():
        with open(fpath, newline="") as f:
            for r in csv.DictReader(f):
                status[r.get("Error", "?")] = status.get(r.get("Error", "?"), 0) + int(r.get("Occurrences", 0))
    return {"requests": n, "failures": fails, "error_rate": fails / n if n else float("nan"),
            "qps": _float(agg["Requests/s"]), "p50_ms": _float(agg["50%"]), "p95_ms": _float(agg["95%"]),
            "p99_ms": _float(agg["99%"]), "max_ms": _float(agg["Max Response Time"]),
            "avg_ms": _float(agg["Average Response Time"]), "by_name": by_name, "failures_by_error": status,
            "duration_s": seconds}


def plot_timeline(prefix: Path, png: Path, title: str = "") -> None:
    """Throughput (per-second from the request counts, and locust's rolling requests/s) and the
    p50/p95/p99 locust reports (over its recent window) against time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t, rolling, total, fails, p50, p95, p99 = [], [], [], [], [], [], []
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("Name") != "Aggregated":
                continue
            t.append(int(r["Timestamp"]))
            rolling.append(_float(r["Requests/s"]))
            total.append(_float(r["Total Request Count"]))
            fails.append(_float(r["Total Failure Count"]))
            p50.append(_float(r["50%"]))
            p95.append(_float(r["95%"]))
            p99.append(_float(r["99%"]))
    t0 = t[0] if t else 0
    x = [v - t0 for v in t]

    def per_second(series):
        return [0.0] + [(b - a) / max(tb - ta, 1) for a, b, ta, tb in zip(series, series[1:], t, t[1:])]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a1.plot(x, per_second(total), label="requests/s")
    a1.plot(x, rolling, label="requests/s (locust, rolling)", linestyle="--")
    a1.plot(x, per_second(fails), label="failures/s", color="tab:red")
    a1.set_ylabel("per second")
    a1.legend(loc="lower right")
    a1.set_title(f"locust run {title}".strip())
    for series, label in ((p50, "p50"), (p95, "p95"), (p99, "p99")):
        a2.plot(x, series, label=label)
    a2.set_ylabel("latency (ms)")
    a2.set_xlabel("seconds since start")
    a2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def targets_note(targets_file: str | Path, profile: str) -> str:
    """What a FAIL against the targets file means and how to set targets for this machine."""
    return (f"note: the targets of {targets_file} (profile {profile!r}) were measured for one machine (2 shared "
            "cores, the service and the client side by side: docs/results/performance.md); they are per machine, "
            "not a property of the service. Measure yours (`python -m loadtest.bench`), then copy the file, put "
            "your numbers in a profile and run with --targets YOUR_FILE --profile NAME (or edit the `locust` "
            "section); a client-bound run (the note above) measures locust, not the service")


def check_targets(summary: dict, targets: dict) -> list[dict]:
    """[{name, target, value, ok}] for each target present in the profile."""
    checks = []
    rules = [("min_qps", "qps", lambda v, t: v >= t), ("max_p50_ms", "p50_ms", lambda v, t: v <= t),
             ("max_p95_ms", "p95_ms", lambda v, t: v <= t), ("max_p99_ms", "p99_ms", lambda v, t: v <= t),
             ("max_error_rate", "error_rate", lambda v, t: v <= t)]
    for key, metric, ok in rules:
        if key in targets and targets[key] is not None:
            v = summary[metric]
            checks.append({"name": key, "target": targets[key], "value": v,
                           "ok": bool(not math.isnan(v) and ok(v, targets[key]))})
    return checks


def _sample_cpu(pid: int, samples: list[tuple[float, float]]) -> None:
    """(time, CPU seconds of locust and its worker processes) every 0.25 s until it exits."""
    import psutil
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    seen: dict[int, float] = {}
    while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        samples.append((time.perf_counter(), sum(seen.values())))
        time.sleep(0.25)


def _steady_cpu(samples: list[tuple[float, float]], wall: float) -> float | None:
    """CPU cores locust used in the middle of the run (25%..85% of it: no start-up, no shutdown)."""
    if len(samples) < 4:
        return None
    t0 = samples[0][0]
    mid = [(t, c) for t, c in samples if 0.25 * wall <= t - t0 <= 0.85 * wall] or samples
    (ta, ca), (tb, cb) = mid[0], mid[-1]
    return round((cb - ca) / (tb - ta), 2) if tb > ta else None


def locust_command(a: argparse.Namespace, prefix: Path, html: Path, seconds: float) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", a.url,
           "-u", str(a.users), "-r", str(a.spawn_rate or a.users), "-t", f"{max(1, int(math.ceil(seconds)))}s",
           "--csv", str(prefix), "--csv-full-history", "--html", str(html), "--only-summary",
           "--stop-timeout", "2", "--loglevel", "WARNING"]
    if a.reset_stats:
        cmd.append("--reset-stats")
    if a.processes and a.processes > 1:
        cmd += ["--processes", str(a.processes)]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=32, help="concurrent locust users (default 32)")
    p.add_argument("--duration", default="60s", help="run time, e.g. 60s, 2m (default 60s)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    p.add_argument("--out", help="output directory (default loadtest/out/<timestamp>)")
    p.add_argument("--processes", type=int, default=1, help="locust worker processes (default 1)")
    p.add_argument("--redis", help="feature store to SCAN for user ids (default $REDIS_URL)")
    p.add_argument("--users-file", help="user ids, one per line, instead of scanning Redis")
    p.add_argument("--zipf", type=float, default=0.0, help="user skew: 0 uniform, else Zipf exponent")
    p.add_argument("--topk-mix", default="5:0.2,20:0.6,50:0.2", help="top_k:weight,... (default %(default)s)")
    p.add_argument("--new-share", type=float, default=0.05,
                   help="share of requests for users not in the store, with body features")
    p.add_argument("--targets", default=str(DEFAULT_TARGETS), help="targets YAML (default loadtest/targets.yaml)")
    p.add_argument("--profile", default="locust", help="section of the targets file (default locust)")
    p.add_argument("--reset-stats", action="store_true", help="reset stats once all users are spawned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--events-share", type=float, default=0.0,
                   help="share of locust users sending POST /events batches instead of tag requests (default 0; "
                        "run `mvke features stream` beside it to apply them)")
    p.add_argument("--events-batch", type=int, default=50, help="events per POST /events (default 50)")
    p.add_argument("--api-key", help="API key for every request (default $MVKE_API_KEY)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not (a.redis or a.users_file or os.environ.get("MVKE_LT_REDIS_URL") or os.environ.get("REDIS_URL")):
        print("error: no user ids: pass --redis URL (a private feature store), --users-file, or set REDIS_URL",
              file=sys.stderr)
        return 2
    seconds = parse_duration(a.duration)
    out = Path(a.out or HERE / "out" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    prefix, html, png = out / "locust", out / "report.html", out / "timeline.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MVKE_LT_ZIPF": str(a.zipf), "MVKE_LT_TOPK_MIX": a.topk_mix, "MVKE_LT_NEW_SHARE": str(a.new_share),
           "MVKE_LT_SEED": str(a.seed), "MVKE_LT_EVENTS_SHARE": str(a.events_share),
           "MVKE_LT_EVENTS_BATCH": str(a.events_batch), "MVKE_LT_API_KEY": a.api_key or os.environ.get("MVKE_API_KEY", "")}
    if a.redis:
        env["MVKE_LT_REDIS_URL"] = a.redis
    if a.users_file:
        env["MVKE_LT_USERS_FILE"] = str(Path(a.users_file).resolve())
    cmd = locust_command(a, prefix, html, seconds)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []
    sampler = threading.Thread(target=_sample_cpu, args=(proc.pid, samples), daemon=True)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=seconds + 60)  # bounded: locust stops itself at -t
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        print(stdout[-3000:], file=sys.stderr)
        print("FAIL: locust did not stop in time", file=sys.stderr)
        return 2
    sampler.join(2)
    cpu_cores = _steady_cpu(samples, time.perf_counter() - t0)
    (out / "locust.log").write_text(stdout)
    if not Path(f"{prefix}_stats.csv").exists():
        print(stdout[-3000:], file=sys.stderr)
        print(f"FAIL: locust exited {proc.returncode} without writing stats", file=sys.stderr)
        return 2
    summary = read_summary(prefix, seconds)
    summary["locust_cpu_cores"] = cpu_cores
    summary["locust_processes"] = a.processes
    plot_timeline(prefix, png, f"{a.url}, {a.users} users, {seconds:g} s")
    targets = (yaml.safe_load(Path(a.targets).read_text()) or {}).get(a.profile, {})
    checks = check_targets(summary, targets)
    summary["checks"] = checks
    summary["pass"] = all(c["ok"] for c in checks)
    summary["outputs"] = {"csv": f"{prefix}_stats.csv", "history_csv": f"{prefix}_stats_history.csv",
                          "html": str(html), "png": str(png)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"locust: {a.users} users, {seconds:g}s, {a.processes} process(es), "
          f"locust used {summary['locust_cpu_cores']} CPU cores")
    print(f"QPS {summary['qps']:.1f}  p50 {summary['p50_ms']:.1f} ms  p95 {summary['p95_ms']:.1f} ms  "
          f"p99 {summary['p99_ms']:.1f} ms  errors {summary['failures']}/{summary['requests']} "
          f"({summary['error_rate']:.2%})")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['value']:.4g} (target {c['target']})")
    if summary["locust_cpu_cores"] and summary["locust_cpu_cores"] >= 0.85 * max(1, a.processes):
        print("  note: locust was CPU-bound; QPS is the client's ceiling, not the service's")
    print(f"{'PASS' if summary['pass'] else 'FAIL'}  (outputs in {out})")
    if not summary["pass"]:
        print(targets_note(a.targets, a.profile))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
