"""What the canary's shadow costs the service: throughput and latency at loadgen c=16 with a canary
loaded, MVKE_SHADOW_SHARE=0 against the given shares, interleaved (one service per share, started
together; the load alternates between them in rounds, so each sees the same machine load).

    PYTHONPATH=. nice -n 10 python scripts/shadow_ab.py --active BUNDLE --canary BUNDLE \\
        --days DAYS_DIR --day 2026-01-07 --out docs/results/daily_loop/shadow_ab.json

A private redis-server holds the two versions (canary at 1%) and the day's feature snapshot.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daily_week import PY, ROOT, cpu_model, load_features, start_service  # noqa: E402


def run_load(port: int, users: list[str], concurrency: int, seconds: float) -> dict:
    spec = {"host": "127.0.0.1", "port": port, "concurrency": concurrency, "duration": seconds, "warmup": 2,
            "requests": [["POST", f"/users/{u}/tags", json.dumps({"top_k": 20})] for u in users]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = subprocess.run([PY, "-m", "loadtest.loadgen", f.name], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--active", required=True)
    p.add_argument("--canary", required=True)
    p.add_argument("--days", required=True, help="days directory (meta.json, snapshots/)")
    p.add_argument("--day", required=True, help="the snapshot loaded into the feature store")
    p.add_argument("--shares", default="0,0.02,0.05", help="MVKE_SHADOW_SHARE values (default 0,0.02,0.05)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import pyarrow.parquet as pq

    from model_export.publish import publish
    from mvke.localredis import LocalRedis
    from mvke.runtime.cycle_record import read_live
    from mvke.runtime.keys import Keys
    from mvke.localredis import free_port
    shares = [float(s) for s in a.shares.split(",")]
    work = Path(tempfile.mkdtemp(prefix="shadow_ab-"))
    with LocalRedis() as srv:
        r, keys = srv.client(), Keys()
        load_features(r, keys, Path(a.days), a.day, work)
        publish(Path(a.active), r, keys=keys)
        canary = publish(Path(a.canary), r, keys=keys, canary_percent=1)["version"]
        users = [str(u) for u in pq.read_table(Path(a.days) / "snapshots" / f"day={a.day}" / "users.parquet",
                                               columns=["user_id"])["user_id"].to_pylist()]
        ports = [free_port() for _ in shares]
        services = {s: start_service(srv.url, port, s, work / f"service-{s}.log") for s, port in zip(shares, ports)}
        runs: dict[float, list[dict]] = {s: [] for s in shares}
        try:
            for _ in range(a.rounds):
                for i, s in enumerate(shares):
                    runs[s].append(run_load(ports[i], users, a.concurrency, a.seconds) | {"loadavg": os.getloadavg()})
        finally:
            for proc in services.values():
                proc.terminate()
                proc.wait(30)
        shadowed = read_live(r, keys, canary).to_dict()     # all services together
    summary = {str(s): {"qps_median": statistics.median(x["ok_qps"] for x in runs[s]),
                        "p50_ms_median": statistics.median(x["p50_ms"] for x in runs[s]),
                        "p99_ms_median": statistics.median(x["p99_ms"] for x in runs[s]),
                        "non_200": sum(sum(v for k, v in x["status"].items() if k != "200") for x in runs[s])}
               for s in shares}
    base = summary[str(shares[0])]["qps_median"]
    for s in shares:
        summary[str(s)]["qps_vs_first"] = round(summary[str(s)]["qps_median"] / base, 3)
    doc = {"summary": summary, "runs": {str(s): runs[s] for s in shares}, "shadowed_total": shadowed,
           "setup": vars(a), "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}}
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
