"""`python -m loadtest.events_bench [--work /tmp/lt] [--duration 8]`: the event path's figures (issue 22).

One run on this machine, all servers private (a redis-server, `mvke serve` with 1 worker,
`mvke features stream` consumer processes, loadtest/loadgen.py for tag requests):

  a. tag requests alone at c=32: QPS (the baseline);
  b. events applied per second by 1 and 2 consumers from pre-filled partition streams, without and
     with tag requests at c=32 beside them (QPS of those, and its share of a.);
  c. freshness: a click on new tags POSTed to /events -> the first answer of POST /users/{id}/tags
     that differs, p50 / p99 over --probes probes, under c=32 tag load with events flowing;
  d. fault runs: a consumer SIGKILLed between applying and acknowledging, a second one taking over
     (sent, applied, duplicates, lost, and equality with a plain replay), and redis-server SIGKILLed
     after acknowledged XADDs with appendfsync always (sent, found after restart, lost).

Data: the default synthetic world and mvke-mt (1 epoch) from `mvke pipeline` under --work (built
once). The events: random users of the store, impressions with 30% clicks and 25% of those converting,
1-3 history values each; the rules update clicked_tags / converted_tags and three counters.
Results go to --out (JSON) and a markdown table beside it, with the CPU model and load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtest.apply_floor import VARIANTS
from loadtest.harness import PY, ROOT, Server, make_requests, pipeline, run_load
from mvke.localredis import LocalRedis
from mvke.runtime.event_apply import EventApplier
from mvke.runtime.event_stream import GROUP, publish_events
from mvke.runtime.events import Event, EventRules
from mvke.runtime.keys import Keys
from mvke.runtime.options import at_least_one
from mvke.runtime.system import cpu_model, loadavg

PARTITIONS = 8
RULES = {"histories": [{"field": "clicked_tags", "on": ["click"]},
                       {"field": "converted_tags", "on": ["conversion"]}],
         "counters": [{"field": "impressions_n", "on": ["impression"]}, {"field": "clicks_n", "on": ["click"]},
                      {"field": "conversions_n", "on": ["conversion"]}],
         "dedup_ids": 1000}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_events(users: list[str], n: int, run: str, seed: int, ts0: int | None = None) -> list[Event]:
    rng = random.Random(seed)
    # in the past (100 events a second up to now): a freshness probe at time.time() is then the user's
    # newest event, not one placed behind bench events dated later (and cut by the history's cap)
    ts0 = ts0 or int(time.time()) - n // 100 - 1
    out: list[Event] = []
    i = 0
    while len(out) < n:
        i += 1
        uid, ts = rng.choice(users), ts0 + i // 100
        tags = [f"t{rng.randrange(1780):04d}" for _ in range(rng.randint(1, 3))]
        base = f"{run}-{i}"
        out.append(Event(base, uid, ts, "impression", {"tags": tags}))
        if rng.random() < 0.3:
            out.append(Event(base + ":click", uid, ts, "click", {"tags": tags}))
            if rng.random() < 0.25:
                out.append(Event(base + ":conversion", uid, ts, "conversion", {"tags": tags}))
    return out[:n]


CONSUMER_NICE = [0]     # --consumer-nice: the consumers' niceness (0: the service's)


def consumer(url: str, rules: Path, name: str, env: dict | None = None, *args: str,
             root: Path = ROOT, apply: str = "real") -> subprocess.Popen:
    """A `mvke features stream` process of the code under `root` (ROOT: this checkout; --before: another);
    `apply`: "real" (the function it ships) or a lower bound of loadtest/apply_floor.py."""
    nice = CONSUMER_NICE[0]
    stream = ["-m", "mvke.cli", "features", "stream"] if apply == "real" else ["-m", "loadtest.apply_floor", apply]
    return subprocess.Popen([PY, *stream, "--redis", url, "--rules", str(rules),
                             "--partitions", str(PARTITIONS), "--name", name, "--batch", "500", *args],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def backlog(r, keys: Keys) -> int:
    """Entries not yet acknowledged: unread (lag) + pending, over every partition."""
    total = 0
    for p in range(PARTITIONS):
        for g in r.xinfo_groups(keys.events_stream(p)):
            total += int(g.get("lag") or 0) + int(g.get("pending") or 0)
    return total


def redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def procs_cpu(procs: list[subprocess.Popen]) -> float:
    import psutil
    total = 0.0
    for p in procs:
        try:
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def reset_streams(r, keys: Keys) -> None:
    r.delete(*[keys.events_stream(p) for p in range(PARTITIONS)])
    for p in range(PARTITIONS):
        r.xgroup_create(keys.events_stream(p), GROUP, id="0", mkstream=True)


def apply_rate(r, redis_url: str, rules: Path, users: list[str], consumers: int, port: int | None,
               reqs: list, duration: float, run: str, root: Path = ROOT, max_rate: float = 0.0,
               apply: str = "real", consumer_args: tuple[str, ...] = ()) -> dict:
    """Events/s of `consumers` processes over a window in which they never run dry (and QPS beside);
    max_rate > 0: the consumers together paced to that many events/s (`--max-rate`, split evenly)."""
    keys = Keys()
    reset_streams(r, keys)
    n = 250_000 if not max_rate else int(max_rate * (duration + 15))
    events = make_events(users, n, run, seed=hash(run) % 1000)
    for i in range(0, n, 20_000):
        publish_events(r, keys, events[i:i + 20_000], PARTITIONS, maxlen=n * 2)
    stream_bytes = sum(r.memory_usage(keys.events_stream(p), samples=0) or 0 for p in range(PARTITIONS))
    pace = ("--max-rate", str(max_rate / consumers)) if max_rate else ()
    procs = [consumer(redis_url, rules, f"{run}-{k}", None, *pace, *consumer_args, root=root, apply=apply)
             for k in range(consumers)]
    load: dict = {}
    thread = None
    if port:
        thread = threading.Thread(target=lambda: load.update(run_load(port, reqs, 32, duration, warmup=1.0)))
    deadline = time.monotonic() + 120
    while backlog(r, keys) >= n and time.monotonic() < deadline:   # consumers import and start reading
        time.sleep(0.1)
    if thread:
        thread.start()
        time.sleep(1.0)        # loadgen's warm-up
    samples = []
    t_end = time.monotonic() + duration
    cpu0 = (redis_cpu(r), procs_cpu(procs))
    stats0 = r.info("commandstats")
    while time.monotonic() < t_end:
        samples.append((time.monotonic(), n - backlog(r, keys)))
        time.sleep(0.25)
    cpu1 = (redis_cpu(r), procs_cpu(procs))
    stats1 = r.info("commandstats")
    if thread:
        thread.join()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)
    (t0, a0), (t1, a1) = samples[1], samples[-1]
    left = backlog(r, keys)
    done = samples[-1][1] - samples[0][1]
    out = {"consumers": consumers, "with_tags": bool(port), "max_rate": max_rate, "events_per_s": round((a1 - a0) / (t1 - t0)),
           "window_s": round(t1 - t0, 2), "ran_dry": left == 0, "loadavg": loadavg(),
           "stream_bytes_per_entry": round(stream_bytes / n),
           "redis_cpu_us_per_event": round(1e6 * (cpu1[0] - cpu0[0]) / done, 1) if done else None,
           "consumer_cpu_us_per_event": round(1e6 * (cpu1[1] - cpu0[1]) / done, 1) if done else None}
    if load:
        out.update(qps=round(load["qps"]), p99_ms=load.get("p99_ms"), status=load.get("status"))
    out["redis_commands"] = command_costs(stats0, stats1, done)
    return out


def command_costs(before: dict, after: dict, events: int) -> dict:
    """Per Redis command over the window: calls per event and Redis CPU us per event (INFO commandstats;
    a function's inner calls are also in its FCALL's time). Every client's commands count: with tag
    requests beside, HGETALL is the service's, and XINFO / INFO are this bench's polling."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {"calls": 0, "usec": 0})
        calls, usec = a["calls"] - b["calls"], a["usec"] - b["usec"]
        if calls and events:
            out[name.removeprefix("cmdstat_")] = {"calls_per_event": round(calls / events, 3),
                                                  "us_per_event": round(usec / events, 2)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_event"]))


def apply_rows(r, redis_url: str, rules: Path, users: list[str], port: int, reqs: list, duration: float,
               before: Path | None, after_first: bool = False) -> list[dict]:
    """Section b: 1 and 2 consumers, without and with tag requests; with `before`, each row twice,
    back to back: the consumers of that checkout, then this one's (same service, Redis, events);
    `after_first` swaps the two (a second run cancels the drift of the box within a pair)."""
    rows = []
    codes = [("before", before), ("after", ROOT)] if before else [("", ROOT)]
    if after_first:
        codes.reverse()
    for consumers in (1, 2):
        for with_tags in (False, True):
            for code, root in codes:
                log(f"b. {consumers} consumer(s), tags {'on' if with_tags else 'off'} {code}")
                row = apply_rate(r, redis_url, rules, users, consumers, port if with_tags else None, reqs, duration,
                                 f"rate-{consumers}-{int(with_tags)}-{code}", root)
                rows.append({"code": code, **row} if code else row)
                log(json.dumps(rows[-1]))
    return rows


def users_per_call(variant: str) -> int | None:
    """N of a "real-uN" variant (what `--users-per-call` accepts: `at_least_one`), else None."""
    if not variant.startswith("real-u"):
        return None
    try:
        return at_least_one(variant.removeprefix("real-u"))
    except (ValueError, argparse.ArgumentTypeError):
        return None


# this checkout's consumer with one apply by name (`mvke features stream --apply`); "real" is its default
# (auto: the compiled MVKE.APPLY, which the bench's private Redis loads where it builds)
APPLY_VARIANTS = {"real-function": "function", "real-native": "native"}


def variant_consumer(variant: str, before: Path | None) -> tuple[Path, str, tuple[str, ...]]:
    """A --variants name -> (checkout, apply function, consumer arguments): "before" (the --before
    checkout's shipped function), "real-uN" (this one's, N users per FCALL), "real-function" / "real-native"
    (this one's with that apply), else this checkout's `variant`."""
    if variant == "before":
        return before, "real", ()
    if (n := users_per_call(variant)) is not None:
        return ROOT, "real", ("--users-per-call", str(n))
    if variant in APPLY_VARIANTS:
        return ROOT, "real", ("--apply", APPLY_VARIANTS[variant])
    return ROOT, variant, ()


def paced_rows(r, redis_url: str, rules: Path, users: list[str], port: int, reqs: list, duration: float,
               rate: float, tags_alone_qps: float, consumer_counts: tuple[int, ...] = (1, 2),
               variants: tuple[str, ...] = ("real",), paired: bool = False, before: Path | None = None) -> list[dict]:
    """Consumers paced to `rate` events/s in all, beside tag requests at c=32: events/s applied and the
    service's QPS as a share of the tags-alone row (the goal: >= rate with >= 80%); per apply variant
    ("real": the shipped function; `floor` / `noop`: loadtest/apply_floor.py's lower bounds; "before": the
    shipped function of the `before` checkout), in turn.
    `paired`: a tags-alone row right before each, and the share of that one too (the box drifts)."""
    rows = []
    for consumers in consumer_counts:
        for i, variant in enumerate(variants):     # a variant may come again (ABBA orders): own event ids
            alone = run_load(port, reqs, 32, duration, warmup=1.0)["qps"] if paired else None
            log(f"b'. {consumers} consumer(s) paced to {rate:,.0f} events/s in all, tags on, apply {variant}")
            root, apply, extra = variant_consumer(variant, before)
            row = apply_rate(r, redis_url, rules, users, consumers, port, reqs, duration,
                             f"paced-{consumers}-{variant}-{i}", root, max_rate=rate, apply=apply, consumer_args=extra)
            row["apply"] = variant
            row["qps_share_of_alone"] = round(row["qps"] / tags_alone_qps, 3) if row.get("qps") else None
            if alone:
                row["tags_alone_just_before"] = round(alone)
                row["qps_share_of_just_before"] = round(row["qps"] / alone, 3) if row.get("qps") else None
            rows.append(row)
            log(json.dumps(row))
    return rows


def state_memory(r, users: list[str], n: int = 300) -> dict:
    """Bytes per user of its event state after the runs (MEMORY USAGE of :ev and :seen), and of its hash."""
    keys = Keys()
    sample = [u for u in users[:5000] if r.exists(keys.user_seen(u))][:n]
    if not sample:
        return {}
    per = {name: round(sum(r.memory_usage(fn(u), samples=0) or 0 for u in sample) / len(sample))
           for name, fn in (("user_hash", keys.user), ("ev", keys.user_events), ("seen", keys.user_seen))}
    per["ids_seen_mean"] = round(sum(r.zcard(keys.user_seen(u)) for u in sample) / len(sample), 1)
    per["users_sampled"] = len(sample)
    return per


def freshness(r, redis_url: str, rules: Path, users: list[str], svc: Server, reqs: list, probes: int) -> dict:
    """A click on 3 new values of clicked_tags -> the first different answer, under c=32 with events flowing."""
    keys = Keys()
    reset_streams(r, keys)
    procs = [consumer(redis_url, rules, f"fresh-{k}", None, "--block-ms", "20") for k in range(2)]
    stop = threading.Event()

    def background() -> None:           # ~2,000 events/s of other users through POST /events
        bg_users = users[len(users) // 2:]
        with httpx.Client(base_url=svc.url, timeout=10) as http:
            k = 0
            while not stop.is_set():
                k += 1
                evs = make_events(bg_users, 200, f"bg-{k}", seed=k)
                http.post("/events", json={"events": [json.loads(e.to_json()) for e in evs]})
                time.sleep(0.1)

    bg = threading.Thread(target=background, daemon=True)
    load: dict = {}
    lt = threading.Thread(target=lambda: load.update(run_load(svc.port, reqs, 32, probes * 0.6 + 6, warmup=1.0)))
    time.sleep(1.5)
    bg.start()
    lt.start()
    time.sleep(2.0)
    lags, misses = [], 0
    rng = random.Random(1)
    with httpx.Client(base_url=svc.url, timeout=10) as http:
        for i in range(probes):
            uid = users[i]
            before = http.post(f"/users/{uid}/tags", json={"top_k": 20}).json()["tasks"]
            tags = [f"t{rng.randrange(1780):04d}" for _ in range(3)]
            ev = {"event_id": f"probe-{i}", "user_id": uid, "ts": int(time.time()), "type": "click", "tags": tags}
            resp = http.post("/events", json={"events": [ev]})
            t0 = time.perf_counter()
            assert resp.status_code == 202 and resp.json()["accepted"] == 1, resp.text
            while True:
                now = http.post(f"/users/{uid}/tags", json={"top_k": 20}).json()["tasks"]
                lag = time.perf_counter() - t0
                if now != before:
                    lags.append(lag)
                    break
                if lag > 5:
                    misses += 1
                    break
                time.sleep(0.002)
    stop.set()
    lt.join()
    bg.join(5)
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    lags.sort()
    return {"probes": probes, "reflected": len(lags), "not_within_5s": misses,
            "p50_ms": round(1000 * statistics.median(lags), 1) if lags else None,
            "p99_ms": round(1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))], 1) if lags else None,
            "max_ms": round(1000 * lags[-1], 1) if lags else None,
            "tag_qps_meanwhile": round(load.get("qps", 0)), "loadavg": loadavg()}


def fault_consumer_kill(r, redis_url: str, rules: Path, users: list[str], n: int) -> dict:
    keys = Keys("fault")
    for p in range(PARTITIONS):
        r.delete(keys.events_stream(p))
    events = make_events(users[:2000], n, "fault", seed=9)
    publish_events(r, keys, events, PARTITIONS, maxlen=n * 2)
    victim = consumer(redis_url, rules, "victim", {"MVKE_EVENTS_PAUSE_BEFORE_ACK_S": "60"}, "--key-prefix", "fault")
    line = victim.stdout.readline()
    assert "pausing before XACK" in line, victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    pending = sum(r.xpending(keys.events_stream(p), GROUP)["pending"] for p in range(PARTITIONS))
    heir = consumer(redis_url, rules, "heir", None, "--key-prefix", "fault", "--claim-idle-ms", "200",
                    "--max-idle-s", "2")
    out, err = heir.communicate(timeout=300)
    stats = json.loads(out.strip().splitlines()[-1])
    ref = Keys("fault-ref")
    EventApplier(r, ref, EventRules.from_meta(json.loads(rules.read_text()))).apply(events)
    touched = sorted({e.user_id for e in events})

    def values(k: Keys, u: str) -> dict:
        return {f: v for f, v in r.hgetall(k.user(u)).items() if f != "_event_at"}

    same = all(values(keys, u) == values(ref, u) for u in touched)
    remembered = sum(r.zcard(keys.user_seen(u)) for u in touched)
    return {"sent": n, "killed_with_pending": pending, "heir_claimed": stats["claimed"],
            "applied_by_victim_before_kill": pending, "applied_by_heir": stats["applied"],
            "duplicates": stats["duplicate"], "applied_once_in_effect": remembered,
            "lost": n - remembered, "equal_to_plain_replay": same}


def fault_redis_kill(work: Path, users: list[str], n: int) -> dict:
    import shutil
    shutil.rmtree(work / "aof", ignore_errors=True)      # a fresh AOF: only this run's events count
    server = LocalRedis(data_dir=work / "aof", extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        r = server.client()
        keys = Keys()
        events = make_events(users, n, "aof", seed=11)
        sent = 0
        for i in range(0, n, 1000):
            publish_events(r, keys, events[i:i + 1000], PARTITIONS)     # acknowledged when it returns
            sent += len(events[i:i + 1000])
        r.close()
        server.kill()
        server.start()
        r = server.client()
        found = sum(r.xlen(keys.events_stream(p)) for p in range(PARTITIONS))
        r.close()
        return {"sent_acknowledged": sent, "found_after_restart": found, "lost": sent - found}
    finally:
        server.stop()


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['nproc']} CPUs, shared with other work; load averages at start "
             f"{m['loadavg_start']}, at end {m['loadavg_end']}. Run: `python -m loadtest.events_bench` "
             f"(window {res['duration_s']} s per row, one redis-server, `mvke serve` with 1 worker).", "",
             "| code | consumers | tag requests c=32 | events applied/s | tag QPS | QPS share of tags alone | "
             "Redis CPU / event | consumer CPU / event | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = res["tags_alone"]["qps"]
    lines.append(f"| - | 0 | yes | - | {base} | 100% | - | - | {res['tags_alone']['loadavg']} |")
    for row in res["apply"]:
        qps = row.get("qps")
        share = f"{100 * qps / base:.0f}%" if qps else "-"
        lines.append(f"| {row.get('code') or '-'} | {row['consumers']} | {'yes' if row['with_tags'] else 'no'} | "
                     f"{row['events_per_s']:,} | {qps if qps else '-'} | {share} | {row['redis_cpu_us_per_event']} us | "
                     f"{row['consumer_cpu_us_per_event']} us | {row['loadavg']} |")
    if "tags_alone_after_rows" in res:
        again = res["tags_alone_after_rows"]
        lines.append(f"| - | 0 | yes | - | {again['qps']} | {100 * again['qps'] / base:.0f}% | - | - | "
                     f"{again['loadavg']} |")
    lines += ["", f"Stream memory: {res['apply'][0]['stream_bytes_per_entry']} bytes per entry (MEMORY USAGE / entries). "
              f"Per user after the runs (bytes, MEMORY USAGE): {json.dumps(res.get('state_memory', {}))}."]
    f = res["freshness"]
    lines += ["", f"Freshness (event accepted -> first answer that reflects it), {f['probes']} probes under c=32 "
                  f"({f['tag_qps_meanwhile']} tag QPS meanwhile, ~2,000 events/s of other users, 2 consumers): "
                  f"p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms; "
                  f"not reflected within 5 s: {f['not_within_5s']}. Load average {f['loadavg']}.", "",
              "Fault runs:", "",
              f"- consumer SIGKILLed between apply and XACK: {json.dumps(res['fault_consumer'])}",
              f"- redis-server SIGKILLed after acknowledged XADDs (appendfsync always): "
              f"{json.dumps(res['fault_redis'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.events_bench", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/lt", help="where `mvke pipeline` builds data and model (reused)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured row (default 8)")
    p.add_argument("--probes", type=int, default=40, help="freshness probes (default 40)")
    p.add_argument("--fault-events", type=int, default=20_000)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "events.json"))
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="a checkout of the code to compare with (e.g. `git archive COMMIT | tar -x -C DIR`): "
                        "each apply row runs its consumers, then this checkout's, back to back")
    p.add_argument("--after-first", action="store_true", help="with --before: this checkout's consumers first")
    p.add_argument("--consumer-nice", type=int, default=0, metavar="N",
                   help="run the consumers at this niceness (the service and Redis stay at 0): what the event path "
                        "gets when the service comes first")
    p.add_argument("--event-rate", type=float, default=0.0, metavar="EPS",
                   help="also rows with the consumers paced to EPS events/s in all (`--max-rate`) beside tag requests "
                        "at c=32: the issue's goal measured at its rate (QPS share of the tags-alone row)")
    p.add_argument("--paced-only", action="store_true",
                   help="with --event-rate: only the tags-alone row and the paced rows (no other section)")
    p.add_argument("--consumers", default="1,2", help="with --event-rate: consumer counts of the paced rows")
    p.add_argument("--paired", action="store_true",
                   help="with --event-rate: a tags-alone row right before each paced row (its share of that too)")
    p.add_argument("--variants", default="real",
                   help="with --event-rate: apply functions of the paced rows, in turn: real (the one the "
                        "consumer ships: the compiled MVKE.APPLY where it builds), real-function / real-native "
                        "(that apply, `--apply`), real-uN (the same with `--users-per-call N`), floor, noop "
                        "(loadtest/apply_floor.py's lower bounds), before (the --before checkout's consumer)")
    a = p.parse_args(argv)
    known = {"real", "before", *APPLY_VARIANTS, *VARIANTS}
    unknown = {v for v in a.variants.split(",") if users_per_call(v) is None} - known
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))} (real-uN, {', '.join(sorted(known))})")
    if "before" in a.variants.split(",") and not a.before:
        p.error("--variants before needs --before DIR")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    CONSUMER_NICE[0] = a.consumer_nice
    res: dict = {"machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "loadavg_start": loadavg()},
                 "duration_s": a.duration, "consumer_nice": a.consumer_nice}
    log("mvke pipeline (built once under --work)")
    done = pipeline(work, "mvke-mt", log=work / "pipeline_events.log")
    rules = work / "events_meta.json"
    meta = json.loads((Path(done["data"]) / "meta.json").read_text())
    rules.write_text(json.dumps({**meta, "events": RULES}))
    server = LocalRedis().start()
    try:
        pipeline(work, "mvke-mt", server.url, log=work / "pipeline_events.log")   # publish + features load
        r = server.client(decode_responses=True)
        import pyarrow.parquet as pq
        users = [str(u) for u in pq.read_table(Path(done["data"]) / "users.parquet",
                                               columns=["user_id"])["user_id"].to_pylist()]
        reqs = make_requests(users, 4096, topk_mix="20:1")
        with Server.service(server.url, workers=1, env={"MVKE_EVENT_PARTITIONS": str(PARTITIONS)}) as svc:
            log("a. tag requests alone, c=32")
            base = run_load(svc.port, reqs, 32, a.duration, warmup=1.0)
            res["tags_alone"] = {"qps": round(base["qps"]), "p99_ms": base.get("p99_ms"), "loadavg": loadavg()}
            if a.event_rate:
                res["paced"] = paced_rows(r, server.url, rules, users, svc.port, reqs, a.duration, a.event_rate,
                                          res["tags_alone"]["qps"], tuple(int(c) for c in a.consumers.split(",")),
                                          tuple(a.variants.split(",")), a.paired, a.before)
            if a.paced_only:
                return _write(res, Path(a.out))
            res["apply"] = apply_rows(r, server.url, rules, users, svc.port, reqs, a.duration, a.before,
                                      a.after_first)
            if a.before:      # the baseline again, after the rows: how much the box moved meanwhile
                again = run_load(svc.port, reqs, 32, a.duration, warmup=1.0)
                res["tags_alone_after_rows"] = {"qps": round(again["qps"]), "p99_ms": again.get("p99_ms"),
                                                "loadavg": loadavg()}
            res["state_memory"] = state_memory(r, users)
            log("c. freshness")
            res["freshness"] = freshness(r, server.url, rules, users, svc, reqs, a.probes)
            log(json.dumps(res["freshness"]))
        log("d. fault runs")
        res["fault_consumer"] = fault_consumer_kill(r, server.url, rules, users, a.fault_events)
        res["fault_redis"] = fault_redis_kill(work, users, a.fault_events)
    finally:
        server.stop()
    return _write(res, Path(a.out))


def _write(res: dict, out: Path) -> int:
    res["machine"]["loadavg_end"] = loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if "apply" in res:
        out.with_suffix(".md").write_text("# Event path figures (issue 22)\n\n" + markdown(res))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
