"""CLI of the export stage: `mvke export | publish | models | features load`."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone


EXTRA = "export"   # the pyproject extra these commands need (named by `mvke` when it is missing)


def _redis(url: str | None):
    import redis

    from mvke.runtime.keys import redis_url
    return redis.Redis.from_url(redis_url(url), socket_timeout=30)


def _export(a: argparse.Namespace) -> None:
    from model_export.bundle import export_checkpoint
    manifest, fig = export_checkpoint(a.ckpt, a.out)
    print(json.dumps({"version": manifest.version, "model": manifest.model, "out": a.out,
                      "export_seconds": round(fig["export_seconds"], 2), "bundle_bytes": fig["bundle_bytes"],
                      "parity": manifest.parity}, indent=1))


def _publish(a: argparse.Namespace) -> None:
    from model_export.publish import publish, rollback, set_canary_percent
    r = _redis(a.redis)
    if a.rollback:
        print(json.dumps(rollback(r), indent=1))
        return
    if not a.bundle:
        if a.canary is not None:  # ramp the current canary to another share
            print(json.dumps(set_canary_percent(r, a.canary), indent=1))
            return
        raise ValueError("publish needs BUNDLE_DIR (or --rollback, or --canary PERCENT to re-set the canary's share)")
    report = publish(a.bundle, r, keep=a.keep, canary_percent=a.canary)
    report["publish_seconds"] = round(report["publish_seconds"], 3)
    print(json.dumps(report, indent=1))


def _promote(a: argparse.Namespace) -> None:
    from model_export.publish import promote
    print(json.dumps(promote(_redis(a.redis)), indent=1))


def _models(a: argparse.Namespace) -> None:
    from model_export.publish import list_versions
    from mvke.runtime.versions import active_version
    r = _redis(a.redis)
    versions = list_versions(r)
    print(f"{'':2}{'version':18}{'model':14}{'size':>10}  published")
    for v in reversed(versions):
        when = datetime.fromtimestamp(v.published_at, timezone.utc).isoformat(timespec="seconds")
        print(f"{'*' if v.active else ' ':2}{v.version:18}{v.model:14}{v.bytes / 1e6:>8.2f}MB  {when}"
              + ("  (rolled back)" if v.rolled_back else "")
              + (f"  (canary, {v.canary_percent:g}% of users)" if v.canary_percent is not None else ""))
    print(f"active: {active_version(r) or 'none'}")


def _features_load(a: argparse.Namespace) -> None:
    from model_export.feature_store import load_dataset_users
    report = load_dataset_users(a.data, _redis(a.redis))
    for bad in report.bad_rows[:50]:
        print(f"bad row: user {bad['user_id']}: field {bad['field']}: {bad['reason']}", file=sys.stderr)
    print(json.dumps({"loaded": report.loaded, "bad_rows": len(report.bad_rows),
                      "seconds": round(report.seconds, 2), "users_per_second": round(report.users_per_second)}))


def register(sub) -> None:
    e = sub.add_parser("export", help="checkpoint -> ONNX bundle (with a parity gate)")
    e.add_argument("ckpt")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export, extra=EXTRA)

    p = sub.add_parser("publish", help="publish a bundle to Redis and activate it")
    p.add_argument("bundle", nargs="?")
    p.add_argument("--redis", help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--keep", type=int, default=3, help="versions to keep")
    p.add_argument("--rollback", action="store_true",
                   help="drop the canary if there is one, else re-activate the previous version")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="publish BUNDLE as the canary, served to PERCENT of users (by a hash of the user id) "
                        "beside the active version; without BUNDLE: change the current canary's share")
    p.set_defaults(func=_publish, extra=EXTRA)

    pr = sub.add_parser("promote", help="make the canary the active version")
    pr.add_argument("--redis", help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    pr.set_defaults(func=_promote, extra=EXTRA)

    m = sub.add_parser("models", help="list published versions")
    m.add_argument("--redis")
    m.set_defaults(func=_models, extra=EXTRA)

    f = sub.add_parser("features", help="feature store").add_subparsers(dest="action", required=True)
    fl = f.add_parser("load", help="load users.parquet into the feature store")
    fl.add_argument("--data", required=True)
    fl.add_argument("--redis")
    fl.set_defaults(func=_features_load, extra=EXTRA)
