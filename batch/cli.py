"""`mvke tag-all`: registered into the `mvke` command line (entry point group `mvke.commands`)."""
from __future__ import annotations

import argparse
import json

from mvke.runtime.keys import add_key_prefix_option
from mvke.runtime.options import add_max_reject_rate_option

EXTRA = "batch"   # the pyproject extra these commands need (named by `mvke` when it is missing)


def _tag_all(a: argparse.Namespace) -> None:
    from batch.tag_all import TagAllConfig, run
    from mvke.runtime.keys import key_prefix
    if not a.bundle and not a.redis:
        # the model comes from --bundle or the active version in --redis ($REDIS_URL as a default is too
        # easy to aim at the wrong store for a billion-row job)
        raise ValueError("tag-all needs --bundle DIR or --redis URL (the active model version)")
    if a.to_redis and not a.redis:
        raise ValueError("--to-redis needs --redis URL")
    if a.if_new_version and not (a.to_redis and not a.bundle):
        raise ValueError("--if-new-version needs --to-redis and the model from --redis (no --bundle)")
    cfg = TagAllConfig(users=a.users, out=a.out, bundle=a.bundle, redis_url=a.redis, top_k=a.top_k,
                       address=a.address, to_redis=a.to_redis, batch_size=a.batch_size, part_rows=a.part_rows,
                       workers=a.workers, provider=a.provider, ort_threads=a.ort_threads,
                       key_prefix=key_prefix(a.key_prefix), redis_ttl_s=a.redis_ttl, progress=not a.no_progress,
                       ann=a.ann, ann_min_tags=a.ann_min_tags, audiences=a.audiences,
                       audience_top_k=a.audience_top_k, audience_min_score=a.audience_min_score,
                       max_reject_rate=a.max_reject_rate, if_new_version=a.if_new_version)
    if (a.audience_top_k is not None or a.audience_min_score is not None) and not a.audiences:
        raise ValueError("--audience-top-k / --audience-min-score need --audiences")
    summary = run(cfg)
    print(json.dumps(summary, indent=1))


def register(sub) -> None:
    t = sub.add_parser("tag-all", help="top K tags per task for every user (offline, Ray Data)",
                       description="Run the exported user tower over a Parquet table of users, score every tag "
                                   "of every task, keep the top K per task and write Parquet "
                                   "(user_id, task, rank, tag, score) under --out (and per-user hashes to Redis "
                                   "with --to-redis). Resumable: rerun the same command after a failure.")
    t.add_argument("--bundle", help="bundle directory from `mvke export` (else the active version in --redis)")
    t.add_argument("--redis", help="Redis URL: the model's source when no --bundle (the active version), "
                                   "and the target of --to-redis")
    t.add_argument("--users", required=True, help="Parquet file or directory: user_id + raw feature columns")
    t.add_argument("--out", required=True, help="output directory (tags/, rejects/, _SUCCESS.json); `{version}` in it "
                   "becomes the model version")
    t.add_argument("--top-k", type=int, default=20, help="tags kept per task and user (default 20)")
    t.add_argument("--address", help="Ray cluster address (default: a local Ray on this machine)")
    t.add_argument("--to-redis", action="store_true", help="also write each user's tags to Redis "
                                                            "(mvke:usertags:v<version>:<user_id>)")
    t.add_argument("--batch-size", type=int, default=4096, help="users per model call (default 4096)")
    t.add_argument("--part-rows", type=int, default=65_536,
                   help="users per part, the unit of scheduling and resumption (default 65536)")
    t.add_argument("--workers", type=int, help="actors, one ORT session each (default: one per CPU)")
    t.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"], help="ONNX Runtime provider")
    t.add_argument("--ort-threads", type=int, default=1, help="ORT intra-op threads per actor (default 1)")
    add_key_prefix_option(t)
    t.add_argument("--redis-ttl", type=int, help="expire the per-user tag keys after this many seconds")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--ann", choices=("auto", "on", "off"), default="auto",
                   help="rank a large catalogue's index candidates (exact rerank): auto from --ann-min-tags tags")
    t.add_argument("--ann-min-tags", type=int, default=50_000, metavar="N",
                   help="catalogue size from which --ann auto uses the index (default 50000)")
    t.add_argument("--audiences", action="store_true",
                   help="also build the tag -> users index (Roaring bitmaps) from the written rows: "
                        "--out/audiences/, and Redis ({mvke:audiences}:latest) when --redis is given")
    t.add_argument("--audience-top-k", type=int, metavar="K",
                   help="a user is in a tag's audience when the tag ranks in the user's top K of the task "
                        "(default: --top-k, every written row)")
    t.add_argument("--audience-min-score", type=float, metavar="S",
                   help="... and its score is at least S (default: no threshold)")
    t.add_argument("--if-new-version", action="store_true",
                   help="the daily profiles' refresh, for a scheduler to call as often as it likes: do nothing "
                        "(exit 0) when the active version's profiles are already complete in Redis (the "
                        "{prefix:usertags}:latest pointer names it), else tag every user with it; needs "
                        "--to-redis and --redis. Pair it with --out DIR/{version}: one job directory per version")
    add_max_reject_rate_option(t, "no _SUCCESS.json, no Redis summary")
    t.set_defaults(func=_tag_all, extra=EXTRA)
