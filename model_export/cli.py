"""CLI of the export stage: `mvke export | publish | models | features load | features stream | events replay`."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from mvke.runtime.event_apply import APPLY_AUTO, APPLY_MODES, USERS_PER_CALL
from mvke.runtime.options import DEFAULT_REJECT_WINDOW, add_max_reject_rate_option, at_least_one
from mvke.runtime.redis_client import REDIS_URL_HELP

EXTRA = "export"   # the pyproject extra these commands need (named by `mvke` when it is missing)


def _redis(url: str | None):
    from mvke.runtime.redis_client import connect   # one node or a Redis Cluster, AUTH/TLS from the URL
    return connect(url, socket_timeout=30, socket_connect_timeout=10)


def _keys(a: argparse.Namespace):
    from mvke.runtime.keys import Keys, key_prefix
    return Keys(key_prefix(a.key_prefix))


def _export(a: argparse.Namespace) -> None:
    from model_export.bundle import export_checkpoint
    manifest, fig = export_checkpoint(a.ckpt, a.out, ann_mode=a.ann, ann_min_tags=a.ann_min_tags,
                                      synthetic_tags=a.synthetic_tags)
    print(json.dumps({"version": manifest.version, "model": manifest.model, "out": a.out, "num_tags": manifest.num_tags,
                      "export_seconds": round(fig["export_seconds"], 2), "bundle_bytes": fig["bundle_bytes"],
                      "parity": manifest.parity, "ann": manifest.ann.get("tasks", {})}, indent=1))
    for task, entry in manifest.ann.get("tasks", {}).items():
        if entry["status"] != "ann":
            print(f"WARNING: task {task} has no candidate index and is served exactly: {entry['reason']}",
                  file=sys.stderr)


def _publish(a: argparse.Namespace) -> None:
    from model_export.publish import publish, rollback, set_canary_percent
    r, keys = _redis(a.redis), _keys(a)
    if a.rollback:
        print(json.dumps(rollback(r, keys), indent=1))
        return
    if not a.bundle:
        if a.canary is not None:  # ramp the current canary to another share
            print(json.dumps(set_canary_percent(r, a.canary, keys), indent=1))
            return
        raise ValueError("publish needs BUNDLE_DIR (or --rollback, or --canary PERCENT to re-set the canary's share)")
    report = publish(a.bundle, r, keep=a.keep, canary_percent=a.canary, keys=keys, force=a.force)
    for warning in report.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    report["publish_seconds"] = round(report["publish_seconds"], 3)
    print(json.dumps(report, indent=1))


def _promote(a: argparse.Namespace) -> None:
    if a.auto:   # one look at the ramp (model_export/ramp.py); exit 1 when it rolled back
        from model_export.ramp import ROLLED_BACK, auto_promote
        from mvke.training.gate import load_policy
        report = auto_promote(_redis(a.redis), _keys(a), load_policy(a.policy))
        print(json.dumps(report, indent=1))
        if report["decision"] == ROLLED_BACK:
            sys.exit(1)
        return
    from model_export.publish import promote
    print(json.dumps(promote(_redis(a.redis), _keys(a)), indent=1))


def _models(a: argparse.Namespace) -> None:
    from mvke.runtime.versions import active_version, published_versions
    r, keys = _redis(a.redis), _keys(a)
    versions = published_versions(r, keys)
    print(f"key prefix {keys.prefix!r}: versions in {keys.versions}, active alias {keys.active}")
    print(f"{'':2}{'version':18}{'model':14}{'size':>10}  published")
    for v in versions:   # newest first
        when = datetime.fromtimestamp(v.published_at, timezone.utc).isoformat(timespec="seconds")
        print(f"{'*' if v.active else ' ':2}{v.version:18}{v.model:14}{v.bytes / 1e6:>8.2f}MB  {when}"
              + ("  (rolled back)" if v.rolled_back else "")
              + (f"  (canary, {v.canary_percent:g}% of users)" if v.canary_percent is not None else "")
              + (f"  gate {v.gate['decision']} on {v.gate['day']}" if v.gate else ""))
    print(f"active: {active_version(r, keys) or 'none'}")   # the last line; docker/trainer-entrypoint.sh reads it


def _features_load(a: argparse.Namespace) -> None:
    from model_export.features_job import FeaturesLoadConfig, load_features
    from mvke.runtime.keys import key_prefix
    if a.ttl is not None and a.ttl < 1:
        raise ValueError(f"--ttl must be >= 1 second, got {a.ttl}")
    report = load_features(FeaturesLoadConfig(a.data, redis_url=a.redis, key_prefix=key_prefix(a.key_prefix),
                                              workers=a.workers, part_rows=a.part_rows, ttl_s=a.ttl,
                                              job_dir=a.job_dir, max_reject_rate=a.max_reject_rate))
    for bad in report.bad_rows[:50]:
        print(f"bad row: user {bad['user_id']}: field {bad['field']}: {bad['reason']}", file=sys.stderr)
    if report.rejected > 50:
        print(f"... {report.rejected} bad rows in all (every one in the job directory's rejects/)", file=sys.stderr)
    print(json.dumps({**report.summary(), "bad_rows": report.rejected}))


def _features_apply_module(a: argparse.Namespace) -> None:
    from mvke.runtime.native_apply import module_path
    path = module_path()
    if path is None:
        raise SystemExit("MVKE.APPLY did not build (no C compiler, or see the warning above): "
                         "consumers use the Lua function")
    print(path)


def _features_stream(a: argparse.Namespace) -> None:
    from model_export.events_job import read_rules, run_consumer
    r, keys = _redis(a.redis), _keys(a)
    rules = read_rules(a.rules, r, keys)
    summary = run_consumer(r, keys, rules, partitions=a.partitions, name=a.name, batch=a.batch,
                           block_ms=a.block_ms, claim_idle_ms=a.claim_idle_ms, state_ttl_s=a.state_ttl,
                           max_idle_s=a.max_idle_s, max_events=a.max_events, max_reject_rate=a.max_reject_rate,
                           reject_window=a.reject_window, metrics_port=a.metrics_port, max_rate=a.max_rate,
                           users_per_call=a.users_per_call, apply=a.apply)
    print(json.dumps(summary), flush=True)
    if summary["error"]:
        raise RuntimeError(summary["error"])


def _events_replay(a: argparse.Namespace) -> None:
    import os
    from model_export.events_job import read_log, read_rules, replay, replay_reject_error
    if a.rate is not None and a.rate <= 0:
        raise ValueError(f"--rate must be > 0 events/s, got {a.rate}")
    log = read_log(a.file)
    error = replay_reject_error(len(log.events), log.rejected, a.max_reject_rate, "nothing was sent")
    if error:
        raise RuntimeError(error)
    client = keys = rules = None
    if a.to != "http":
        client, keys = _redis(a.redis), _keys(a)
    if a.to == "apply":
        rules = read_rules(a.rules, client, keys)
    if a.to == "http" and not a.url:
        raise ValueError("--to http needs --url (the service, e.g. http://127.0.0.1:8000)")
    report = replay(log.events, a.to, client=client, keys=keys, rules=rules, url=a.url,
                    api_key=a.api_key or os.environ.get("MVKE_API_KEY"), partitions=a.partitions, rate=a.rate,
                    batch=a.batch, rejected=log.rejected, max_reject_rate=a.max_reject_rate)
    print(json.dumps(report), flush=True)
    if report["error"]:
        raise RuntimeError(report["error"])


def _redis_options(parser: argparse.ArgumentParser) -> None:
    from mvke.runtime.keys import add_key_prefix_option
    parser.add_argument("--redis", metavar="URL", help=REDIS_URL_HELP)
    add_key_prefix_option(parser)


def register(sub) -> None:
    e = sub.add_parser("export", help="checkpoint -> ONNX bundle (with a parity gate)",
                       description="Export a checkpoint of `mvke train` to a bundle directory: the user tower as "
                                   "ONNX, the tag side as arrays, manifest.json with sha256 of every file. Fails "
                                   "(and writes nothing) when the bundle's scores differ from PyTorch's.")
    e.add_argument("ckpt", metavar="CKPT_DIR", help="checkpoint directory written by `mvke train --out`")
    e.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write (replaced whole)")
    e.add_argument("--ann", choices=("auto", "on", "off"), default="auto",
                   help="candidate indexes for large catalogues: auto = from --ann-min-tags tags up")
    e.add_argument("--ann-min-tags", type=int, default=50_000, metavar="N",
                   help="catalogue size from which --ann auto builds an index (default 50000)")
    e.add_argument("--synthetic-tags", type=int, default=0, metavar="N",
                   help="benchmarks: grow the catalogue to N tags with the trained tag tower on synthetic ids")
    e.set_defaults(func=_export, extra=EXTRA)

    p = sub.add_parser("publish", help="publish a bundle to Redis and activate it",
                       description="Write BUNDLE_DIR to Redis as a new version (all or nothing), verify it, then "
                                   "switch the active alias to it (or serve it as a canary beside it); a running "
                                   "service picks it up within MVKE_MODEL_POLL_S.")
    p.add_argument("bundle", nargs="?", metavar="BUNDLE_DIR", help="bundle directory written by `mvke export --out`")
    _redis_options(p)
    p.add_argument("--keep", type=int, default=3, metavar="N", help="versions to keep (default 3); older ones are deleted")
    p.add_argument("--rollback", action="store_true",
                   help="drop the canary if there is one, else re-activate the previous version")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="publish BUNDLE as the canary, served to PERCENT of users (by a hash of the user id) "
                        "beside the active version; without BUNDLE: change the current canary's share")
    p.add_argument("--force", action="store_true",
                   help="publish even when the bundle's features do not match the feature store's recorded schema "
                        "(the service then reports the mismatch in /readyz and does not serve such a canary)")
    p.set_defaults(func=_publish, extra=EXTRA)

    pr = sub.add_parser("promote", help="make the canary the active version (--auto: step the ramp by the policy)",
                        description="Make the canary (`mvke publish BUNDLE --canary PERCENT`) the active version: "
                                    "the alias flip and the canary's removal in one Lua script, so every user moves "
                                    "at once; running services follow within MVKE_MODEL_POLL_S. --auto: one look at "
                                    "the canary's ramp step instead: from its live figures (errors, shadow top-20 "
                                    "overlap and score shift) hold, step to the next share, promote after the last, "
                                    "or roll back (exit 1): docs/OPERATIONS.md. Fails when there is no canary. "
                                    "Environment: REDIS_URL (or --redis), MVKE_KEY_PREFIX (or --key-prefix), "
                                    "MVKE_REDIS_CLUSTER.")
    _redis_options(pr)
    pr.add_argument("--auto", action="store_true", help="step the ramp by the policy's promotion rules (run it on a schedule)")
    pr.add_argument("--policy", metavar="FILE", help="with --auto: policy YAML (default: `mvke cycle --print-policy`)")
    pr.set_defaults(func=_promote, extra=EXTRA)

    m = sub.add_parser("models", help="list published versions",
                       description="List the versions in Redis (newest first): size, publish time, which is active "
                                   "and which is the canary.")
    _redis_options(m)
    m.set_defaults(func=_models, extra=EXTRA)

    f = sub.add_parser("features", help="feature store").add_subparsers(dest="action", required=True)
    fl = f.add_parser("load", help="load users.parquet into the feature store (parallel, resumable by part)",
                      description="Every user of DIR's users.parquet (a file or a directory of parts; the fields of "
                                  "DIR/meta.json) -> one Redis hash per user, replacing that user's previous hash; "
                                  "other users are left alone. Resumable: rerun the same command after a failure "
                                  "and finished parts are skipped. Bad rows are reported and the rest is loaded; "
                                  "more than --max-reject-rate of them fails the job. A job that succeeds records "
                                  "the fields it wrote: `mvke publish` refuses a model that cannot read them.")
    fl.add_argument("--data", required=True, metavar="DIR", help="dataset directory (meta.json + users.parquet)")
    _redis_options(fl)
    fl.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU, less one when Redis is on this machine)")
    fl.add_argument("--ttl", type=int, metavar="SECONDS", help="expire each user hash this many seconds after its load")
    fl.add_argument("--part-rows", type=int, default=262_144, metavar="N", help="users per part (the unit of resumption)")
    fl.add_argument("--job-dir", metavar="DIR", help="markers and rejects (default DATA/_features_load)")
    add_max_reject_rate_option(fl, "no success marker, no schema record")
    fl.set_defaults(func=_features_load, extra=EXTRA)

    fs = f.add_parser("stream", help="apply user events from the event streams (a consumer of the group)",
                      description="Read the partition streams {PREFIX:events:<p>} with the consumer group `apply` "
                                  "(XREADGROUP), apply each batch to the feature store (one Lua function call per user: "
                                  "atomic, idempotent by event id, in time order), XACK it; malformed events go to "
                                  "the dead-letter stream with their reason. Run several: the group shares the "
                                  "work; entries a killed consumer left unacknowledged are taken over (XAUTOCLAIM) "
                                  "after --claim-idle-ms. Prints its counts when it stops (SIGTERM, Ctrl-C, "
                                  "--max-idle-s).")
    _redis_options(fs)
    fs.add_argument("--rules", metavar="META", help="meta.json (or dataset directory) whose `events` section says "
                                                   "which fields events update (default: the active version's "
                                                   "manifest)")
    fs.add_argument("--partitions", type=int, metavar="N", help="partition streams (default $MVKE_EVENT_PARTITIONS "
                                                                "or 8; the same as the producers')")
    fs.add_argument("--name", help="consumer name (default host-pid)")
    fs.add_argument("--batch", type=int, default=500, metavar="N", help="entries per read and partition (default 500)")
    fs.add_argument("--users-per-call", type=at_least_one, default=USERS_PER_CALL, metavar="N",
                    help=f"one Redis node: users per FCALL (at most 2N events; default {USERS_PER_CALL}). 1: one call per "
                         "user, the shortest time Redis is held from the service's reads; 16: ~10%% less consumer CPU per "
                         "event, for catching up a backlog with no service beside. A cluster always makes one call per user")
    fs.add_argument("--apply", choices=APPLY_MODES, default=APPLY_AUTO,
                    help="auto (default): the compiled MVKE.APPLY where this Redis has the module loaded (one node, one "
                         "call per user; mvke/runtime/native_apply.py), else the Lua function; function or native: "
                         "that one (native fails without the module)")
    fs.add_argument("--block-ms", type=int, default=100, metavar="MS", help="wait for new entries per read (default 100)")
    fs.add_argument("--claim-idle-ms", type=int, default=30_000, metavar="MS",
                    help="take over entries another consumer left unacknowledged this long (default 30000)")
    fs.add_argument("--state-ttl", type=int, default=86_400, metavar="S",
                    help="a user's event state (ids seen, history order) expires S seconds after its last event: "
                         "the horizon for duplicates and late events (default 86400)")
    fs.add_argument("--max-idle-s", type=float, metavar="S", help="stop after this long without entries")
    fs.add_argument("--max-events", type=int, metavar="N", help="stop after reading this many entries")
    fs.add_argument("--max-rate", type=float, default=0.0, metavar="EPS",
                    help="apply at most EPS entries per second (default 0: as fast as it can); on a box shared with "
                         "the service, the event path then leaves serving its share, and a burst waits in the stream")
    add_max_reject_rate_option(fs, "the consumer stops; its entries are acknowledged, the bad ones in the "
                               "dead-letter stream", "events", "judged over the last --reject-window entries read")
    fs.add_argument("--reject-window", type=int, default=DEFAULT_REJECT_WINDOW, metavar="N",
                    help=f"entries over which the dead-letter rate is judged (default {DEFAULT_REJECT_WINDOW})")
    fs.add_argument("--metrics-port", type=int, metavar="PORT",
                    help="serve Prometheus metrics (entries by outcome, the dead-letter rate) on this port")
    fs.set_defaults(func=_features_stream, extra=EXTRA)

    fm = f.add_parser("apply-module", help="build the compiled event apply (MVKE.APPLY) and print its path, "
                                           "for `redis-server --loadmodule PATH` of a Redis of your own",
                      description="Compile mvke/runtime/native/mvke_apply.c (a Redis module: the events' apply "
                                  "without Lua, about half the Redis CPU per event) with the machine's C compiler "
                                  "($CC or cc) into ~/.cache/mvke, once per source, and print the .so path. "
                                  "Load it with `redis-server --loadmodule PATH`; `mvke features stream` uses it "
                                  "where the server has it (docs/DEPLOY.md). Exit 1 when it does not build.")
    fm.set_defaults(func=_features_apply_module, extra=EXTRA)

    ev = sub.add_parser("events", help="user events").add_subparsers(dest="action", required=True)
    rp = ev.add_parser("replay", help="replay a log (Parquet impressions or JSON-lines events) as events",
                       description="Each impression row becomes an impression event plus a click and a conversion "
                                   "event when labelled (ids from its event_id column, else user:timestamp:row, so "
                                   "a second replay is all duplicates), sent in time order to a service "
                                   "(--to http: POST /events), the event streams (--to stream) or applied here "
                                   "(--to apply).")
    rp.add_argument("file", metavar="FILE", help="Parquet log (docs/OWN_DATA.md columns) or .jsonl events")
    rp.add_argument("--to", choices=("http", "stream", "apply"), default="stream",
                    help="http: POST /events of --url; stream: XADD to the event streams (default); apply: here, "
                         "with --rules")
    rp.add_argument("--rate", type=float, metavar="R", help="at most R events per second (default: no limit)")
    rp.add_argument("--url", help="the service for --to http")
    rp.add_argument("--api-key", help="API key for --to http (default $MVKE_API_KEY)")
    rp.add_argument("--rules", metavar="META", help="for --to apply: meta.json with an `events` section")
    rp.add_argument("--partitions", type=int, metavar="N", help="for --to stream (default $MVKE_EVENT_PARTITIONS or 8)")
    rp.add_argument("--batch", type=int, default=500, metavar="N", help="events per request / pipeline (default 500)")
    add_max_reject_rate_option(rp, "nothing sent when the file alone is above it", "events",
                               "invalid rows or lines, and events the target rejects, count")
    _redis_options(rp)
    rp.set_defaults(func=_events_replay, extra=EXTRA)

    from model_export.cycle_cli import register as register_cycle
    register_cycle(sub)
