"""`python -m loadtest.oip_bench`: the native route vs the Open Inference Protocol, in one run.

One service (`mvke serve --workers 1 --grpc-port P`, the mvke-mt model of `mvke pipeline`
on a private Redis) answers four kinds of request for the same users, one user per call,
top_k 20, every task:

    native       POST /users/{id}/tags                         {"top_k": 20}
    rest-json    POST /v2/models/mvke/infer                    JSON tensors in and out
    rest-binary  POST /v2/models/mvke/infer                    binary tensor extension in and out
    grpc         inference.GRPCInferenceService/ModelInfer     raw_input_contents / raw_output_contents
    grpc-stream  inference.GRPCInferenceService/ModelStreamInfer   the same messages on long-lived streams

Each is measured at concurrency 32 (QPS) and 1 (p50 latency), closed loop, the client on the
same machine, in `--rounds` rounds whose order rotates (medians reported), with the server's
CPU time per answer (psutil: on a shared machine QPS follows the other processes' load, CPU
per answer much less), the client processes' CPU per answer, and the mean batch (requests per
model call, from /metrics).
Clients, the same shape for every kind: `--client-procs` processes (default 2, one per core of
the 2-core box) sharing the 32 connections or calls in flight at c=32, one process at c=1. HTTP
rows: loadtest/loadgen.py (raw keep-alive sockets on uvloop, pre-rendered requests: the cheapest
client we have). gRPC: grpcio's asyncio channel on uvloop, one per process, with pre-serialized
ModelInferRequest bytes (built once with tritonclient's protobuf messages): the same kind of
client (a loop, pre-built requests, nothing parsed beyond the status), so the rows compare the
server's routes. `--baseline ROOT` also serves another checkout (e.g. `git archive main`) in
the same run, its rows measured in turn with this checkout's: before/after at the same load.
`--ceilings` adds the empty servers (loadtest/empty_app.py over HTTP, loadtest/empty_grpc.py:
grpcio's asyncio server answering at once) under the same clients: what each transport costs
by itself.
Prints a table with the CPU model and the load average;
writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import struct
from statistics import median
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import orjson

from loadtest.api_bench import cpu_seconds
from loadtest.bench import dataset_user_ids, machine
from loadtest.harness import PY, ROOT, Server, make_requests, pipeline, run_load, start_redis
from loadtest.loadgen import Stats, summarize
from mvke.localredis import free_port
from mvke.runtime.system import loadavg

INFER = "/v2/models/mvke/infer"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
KINDS = ("native", "rest-json", "rest-binary", "grpc", "grpc-stream")
STREAM_ERROR = b"\x0a"     # a ModelStreamInferResponse that starts with field 1: a non-empty error_message


def rest_requests(ids: list[str], binary: bool, top_k: int) -> list[list]:
    rows = []
    for uid in ids:
        if binary:
            raw = struct.pack("<I", len(uid.encode())) + uid.encode()
            head = orjson.dumps({"inputs": [{"name": "user_id", "shape": [1], "datatype": "BYTES",
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"top_k": top_k, "binary_data_output": True}})
            body = head + raw
            assert body.isascii(), "loadgen sends bodies as UTF-8 text: ASCII user ids only"
            rows.append(["POST", INFER, body.decode(), {"Content-Type": "application/octet-stream",
                                                        "Inference-Header-Content-Length": str(len(head))}])
        else:
            rows.append(["POST", INFER, orjson.dumps({
                "inputs": [{"name": "user_id", "shape": [1], "datatype": "BYTES", "data": [uid]}],
                "parameters": {"top_k": top_k}}).decode()])
    return rows


def grpc_requests(ids: list[str], top_k: int) -> list[str]:
    """Serialized ModelInferRequests (base64, for the JSON spec of the client process)."""
    from tritonclient.grpc import service_pb2 as pb
    out = []
    for uid in ids:
        req = pb.ModelInferRequest(model_name="mvke")
        req.inputs.add(name="user_id", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(uid.encode())) + uid.encode())
        req.parameters["top_k"].int64_param = top_k
        out.append(base64.b64encode(req.SerializeToString()).decode())
    return out


async def _grpc_load(spec: dict) -> dict:
    import grpc
    reqs = [base64.b64decode(r) for r in spec["requests"]]
    stats = Stats(False)
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        call = channel.unary_unary(METHOD)          # no (de)serializers: bytes in, bytes out
        await call(reqs[0])                          # connect (and fail early)
        t0 = time.perf_counter()
        stop_at = t0 + spec["warmup"] + spec["duration"]
        counter = iter(range(1 << 62))

        async def worker():
            # grpc-stream: one ModelStreamInfer call per worker, one request in flight on it at a time
            stream = channel.stream_stream(STREAM_METHOD)() if spec.get("stream") else None
            while time.perf_counter() < stop_at:
                req = reqs[next(counter) % len(reqs)]
                start = time.perf_counter_ns()
                try:
                    if stream is None:
                        await call(req)
                    else:
                        await stream.write(req)
                        if (await stream.read())[:1] == STREAM_ERROR:
                            stats.error("stream error_message")
                            continue
                except grpc.aio.AioRpcError as e:
                    stats.error(e.code().name)
                    continue
                stats.record(200, time.perf_counter_ns() - start)
            if stream is not None:
                await stream.done_writing()

        async def measure():
            await asyncio.sleep(spec["warmup"])
            stats.measuring, stats.t_start = True, time.perf_counter()
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            stats.measuring = False

        await asyncio.gather(measure(), *(worker() for _ in range(spec["concurrency"])))
    return {"lat": stats.lat, "status": stats.status, "seconds": stop_at - stats.t_start}


def run_grpc(target: str, requests: list[str], concurrency: int, duration: float, warmup: float = 1.0,
             processes: int = 2, stream: bool = False) -> dict:
    """Closed-loop gRPC load from `processes` client processes (a channel each; concurrency split
    between them), as run_http's loadgen processes."""
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    stats, seconds = Stats(False), []
    with tempfile.TemporaryDirectory() as tmp:      # results as files: a pipe cut long lines at 64 KiB
        outs = [str(Path(tmp) / f"client{i}.json") for i in range(procs)]
        running = [subprocess.Popen([PY, "-m", "loadtest.oip_bench", "--grpc-client"], stdin=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in shares]
        for p, c, out in zip(running, shares, outs):
            p.stdin.write(json.dumps({"target": target, "requests": requests, "concurrency": c, "duration": duration,
                                      "warmup": warmup, "out": out, "stream": stream}))
            p.stdin.close()
        for p, out in zip(running, outs):
            err = p.stderr.read()
            if p.wait(warmup + duration + 60) != 0:
                raise RuntimeError(f"gRPC client failed: {err[-2000:]}")
            part = json.loads(Path(out).read_text())
            stats.lat += part["lat"]
            for k, v in part["status"].items():
                stats.status[k] = stats.status.get(k, 0) + v
            seconds.append(part["seconds"])
    return summarize(stats, max(seconds))


def run_http(port: int, requests: list, concurrency: int, duration: float, processes: int = 2) -> dict:
    """loadgen from `processes` processes at once (connections split between them), as the gRPC
    client: the same number of client processes for every kind. QPS and status add up; p50/p99 are
    the median of the processes' own (each saw the same server)."""
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(procs) as pool:
        parts = list(pool.map(lambda c: run_load(port, requests, c, duration), shares))
    status: dict[str, int] = {}
    for part in parts:
        for k, v in part["status"].items():
            status[k] = status.get(k, 0) + v
    return {"qps": sum(p["qps"] for p in parts), "p50_ms": median(p["p50_ms"] for p in parts),
            "p99_ms": median(p["p99_ms"] for p in parts), "status": status}


def batch_totals(server: Server) -> tuple[float, float]:
    """(requests, model calls) so far, from the service's mvke_model_batch_size histogram."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = dict(re.findall(r"^mvke_model_batch_size_(sum|count) (\S+)$", text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


@dataclass
class Endpoint:
    """What a row's load goes to: the HTTP port and/or the gRPC target, the server's CPU seconds so far,
    its (requests, model calls) so far (None: a ceiling server, no model)."""
    port: int
    target: str
    cpu: Callable[[], float]
    batches: Callable[[], tuple[float, float]] | None = None

    @classmethod
    def of(cls, server: Server, target: str) -> "Endpoint":
        return cls(server.port, target, lambda: cpu_seconds(server), lambda: batch_totals(server))


def measure(end: Endpoint, kind: str, requests: list, duration: float, procs: int = 2) -> dict:
    """QPS at c=32 and latency at c=1 of one kind, with the server's CPU per answer and the mean batch."""
    row = {}
    for c in (32, 1):
        cpu0, t0, (req0, calls0) = end.cpu(), time.monotonic(), end.batches() if end.batches else (0, 0)
        client0 = _children_cpu()
        n = procs if c > 1 else 1
        res = (run_grpc(end.target, requests, c, duration, processes=n, stream=kind == "grpc-stream")
               if kind.startswith("grpc") else run_http(end.port, requests, c, duration, processes=n))
        served = res["qps"] * (time.monotonic() - t0)           # about: the warm-up counted at the same rate
        row[f"c{c}"] = {k: res[k] for k in ("qps", "p50_ms", "p99_ms", "status")}
        # server CPU per answer: far less sensitive to the other processes on a shared machine than QPS
        row[f"c{c}"]["server_cpu_us"] = round((end.cpu() - cpu0) * 1e6 / max(served, 1), 1)
        row[f"c{c}"]["client_cpu_us"] = round((_children_cpu() - client0) * 1e6 / max(served, 1), 1)
        req1, calls1 = end.batches() if end.batches else (0, 0)
        row[f"c{c}"]["mean_batch"] = round((req1 - req0) / max(calls1 - calls0, 1), 2)   # requests per model call
    row["loadavg"] = loadavg()
    return row


def _children_cpu() -> float:
    """CPU seconds of the client processes so far (every loadgen and gRPC client is a waited-for child)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def start_grpc_ceiling() -> tuple[subprocess.Popen, Endpoint]:
    """loadtest/empty_grpc.py on a free port, once it accepts calls."""
    import grpc
    import psutil
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "loadtest.empty_grpc", str(port)], cwd=ROOT, start_new_session=True)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    ps = psutil.Process(proc.pid)
    return proc, Endpoint(0, f"127.0.0.1:{port}", lambda: sum(ps.cpu_times()[:2]))


def check_answers(server: Server, grpc_target: str, uid: str, top_k: int) -> None:
    """Each kind answers 200 with the same tags before anything is timed."""
    import tritonclient.grpc as grpcclient
    import numpy as np
    native = httpx.post(f"{server.url}/users/{uid}/tags", json={"top_k": top_k}, timeout=10).json()
    c = grpcclient.InferenceServerClient(grpc_target)
    x = grpcclient.InferInput("user_id", [1], "BYTES")
    x.set_data_from_numpy(np.array([uid], dtype=object))
    res = c.infer("mvke", [x], parameters={"top_k": top_k})
    for task, ranked in native["tasks"].items():
        assert [t.decode() for t in res.as_numpy(f"{task}_tags")[0]] == [r["tag"] for r in ranked], task
    c.close()
    for body in rest_requests([uid], False, top_k) + rest_requests([uid], True, top_k):
        headers = body[3] if len(body) > 3 else {"Content-Type": "application/json"}
        resp = httpx.post(server.url + INFER, content=body[2].encode(), headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.oip_bench", description=__doc__.split("\n")[0])
    p.add_argument("--grpc-client", action="store_true", help=argparse.SUPPRESS)   # the gRPC load process
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement (after 1 s warm-up)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four kinds (medians reported)")
    p.add_argument("--kinds", default=",".join(KINDS), help="which of " + ", ".join(KINDS))
    p.add_argument("--client-procs", type=int, default=2, help="client processes at c=32, for every kind")
    p.add_argument("--baseline", help="another checkout to serve and measure in the same run (rows `<kind>@base`)")
    p.add_argument("--ceilings", action="store_true", help="also the empty servers: loadtest/empty_app.py (HTTP) "
                                                           "and loadtest/empty_grpc.py (gRPC), rows http-empty, grpc-empty")
    p.add_argument("--users", type=int, default=4096, help="synthetic users of the model (and of the requests)")
    p.add_argument("--work", default="/tmp/oip_bench", help="mvke pipeline's work dir (built once, reused)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "oip_bench.json"))
    return p.parse_args(argv)


def _report(a: argparse.Namespace) -> dict:
    http = f"loadtest/loadgen.py (raw HTTP/1.1 sockets, uvloop) in {a.client_procs} processes"
    return {"machine": machine(), "loadavg_start": loadavg(), "duration_s": a.duration, "top_k": a.top_k,
            "model": {"name": "mvke-mt", "users": a.users, "tags": 1780}, "workers": 1,
            "clients": {"native": http, "rest-json": http, "rest-binary": http,
                        "grpc": f"grpcio aio channels (uvloop) in {a.client_procs} processes, pre-serialized requests",
                        "grpc-stream": "the same, one ModelStreamInfer call per in-flight slot (a request "
                                       "written, its answer read, the next written on the same stream)"},
            "baseline": a.baseline, "rounds": {}, "rows": {}}


def _rounds(a: argparse.Namespace, runs: list[tuple[str, str, Endpoint]], load: dict, report: dict) -> None:
    """`--rounds` rounds of every (label, kind, endpoint); the order rotates per round (drift spreads out)."""
    for r in range(a.rounds):
        shift = r * 2 % len(runs)
        for label, kind, end in runs[shift:] + runs[:shift]:
            row = measure(end, kind, load[kind], a.duration, a.client_procs)
            report["rounds"].setdefault(label, []).append(row)
            print(f"round {r + 1} {label:17s} c=32 {row['c32']['qps']:7.0f} QPS "
                  f"({row['c32']['server_cpu_us']:.0f} us server CPU each, batch {row['c32']['mean_batch']:.1f})   "
                  f"c=1 p50 {row['c1']['p50_ms']:.3f} ms   status {row['c32']['status']} / {row['c1']['status']}   "
                  f"load {row['loadavg']}", flush=True)
    for label, rows in report["rounds"].items():
        report["rows"][label] = {"c32_qps": median(x["c32"]["qps"] for x in rows),
                                 "c32_server_cpu_us": median(x["c32"]["server_cpu_us"] for x in rows),
                                 "c32_mean_batch": median(x["c32"]["mean_batch"] for x in rows),
                                 "c32_client_cpu_us": median(x["c32"]["client_cpu_us"] for x in rows),
                                 "c1_p50_ms": median(x["c1"]["p50_ms"] for x in rows),
                                 "c1_server_cpu_us": median(x["c1"]["server_cpu_us"] for x in rows)}


def _print(a: argparse.Namespace, report: dict) -> None:
    print(f"\nmedians of {a.rounds} rounds, {a.duration:g} s each, 1 worker, top_k {a.top_k}, "
          f"{a.client_procs} client processes at c=32:")
    print(f"{'':17s} {'c=32 QPS':>9s} {'us CPU/ans':>10s} {'client us':>10s} {'batch':>6s} {'c=1 p50 ms':>11s} "
          f"{'us CPU/ans':>10s}")
    for label, row in report["rows"].items():
        print(f"{label:17s} {row['c32_qps']:9.0f} {row['c32_server_cpu_us']:10.0f} {row['c32_client_cpu_us']:10.0f} "
              f"{row['c32_mean_batch']:6.1f} {row['c1_p50_ms']:11.3f} {row['c1_server_cpu_us']:10.0f}")
    print(f"CPU: {report['machine']['cpu']} ({report['machine']['nproc']} CPUs); load average start "
          f"{report['loadavg_start']}, end {report['loadavg_end']}")


def _measure_all(a: argparse.Namespace, redis_url: str, ids: list[str], load: dict, report: dict) -> None:
    """Serve this checkout (and --baseline, --ceilings), check their answers, measure every row."""
    roots = {"": ROOT, **({"@base": Path(a.baseline)} if a.baseline else {})}
    ports = {name: free_port() for name in roots}
    servers = {name: Server.service(redis_url, workers=1, env={"MVKE_GRPC_PORT": str(ports[name])}, root=root)
               for name, root in roots.items()}
    ceilings: list = []
    try:
        runs = []
        for name, server in servers.items():
            server.start()
            check_answers(server, f"127.0.0.1:{ports[name]}", ids[0], a.top_k)
            runs += [(kind + name, kind, Endpoint.of(server, f"127.0.0.1:{ports[name]}"))
                     for kind in a.kinds.split(",")]
        if a.ceilings:     # the empty servers: what HTTP (uvicorn) and gRPC (grpcio) cost by themselves
            empty = Server.asgi("loadtest.empty_app:app", workers=1).start()
            grpc_proc, grpc_end = start_grpc_ceiling()
            ceilings = [empty, grpc_proc]
            runs += [("http-empty", "native", Endpoint(empty.port, "", lambda: cpu_seconds(empty))),
                     ("grpc-empty", "grpc", grpc_end)]
        _rounds(a, runs, load, report)
    finally:
        for server in [*servers.values(), *ceilings]:
            if isinstance(server, Server):
                server.stop()
            else:
                server.terminate()
                server.wait(10)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.grpc_client:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        spec = json.loads(sys.stdin.read())
        Path(spec["out"]).write_text(json.dumps(asyncio.run(_grpc_load(spec))))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    size = ["--users", str(a.users)]      # the catalogue keeps its default 1,780 tags: the serving cost
    print(f"mvke pipeline: mvke-mt (1 epoch, {a.users} users) under {work} (steps whose output exists are skipped)")
    data = Path(pipeline(work, "mvke-mt", log=work / "pipeline_mvke.log", extra=size)["data"])
    redis = start_redis()
    try:
        pipeline(work, "mvke-mt", redis.url, log=work / "pipeline_publish.log", extra=size)   # publish + features
        ids = dataset_user_ids(data)[:4096]
        load = {"native": make_requests(ids, 4096, topk_mix=f"{a.top_k}:1", seed=1),
                "rest-json": rest_requests(ids, False, a.top_k), "rest-binary": rest_requests(ids, True, a.top_k),
                "grpc": grpc_requests(ids, a.top_k)}
        load["grpc-stream"] = load["grpc"]
        report = _report(a)
        _measure_all(a, redis.url, ids, load, report)
        report["loadavg_end"] = loadavg()
    finally:
        redis.stop()
    _print(a, report)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
