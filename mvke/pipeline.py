"""`mvke pipeline`: data -> train -> export -> features -> publish, each step skipped when its inputs are unchanged.

The one recipe of the demo, the docker trainer and the benchmarks (scripts/quickstart.py,
docker/trainer-entrypoint.sh, loadtest/bench.py, batch/bench.py and loadtest/gpu_check.py
call it). Each step is the stage's own command (`mvke data synth`, `mvke train`,
`mvke export`, `mvke features load`, `mvke publish`), run in this process through the
`mvke` entry points, so this module imports no stage. Layout under --work:

    data/synth-<users>u-s<seed>/, data/ml100k-s<seed>/   (a --data-source DIR is used as it is)
    ckpt/<model>-<dataset>-e<epochs>-s<seed>-<key>/
    bundle/<model>-<dataset>-e<epochs>-s<seed>-<key>/

The cache is keyed by content (mvke/runtime/fingerprint.py): `<key>` is a fingerprint of
every input file of the dataset (sha256 of meta.json, train/test/users Parquet) and of the
training configuration (model, epochs, seed, learning rate). Change one byte of the data and the key
changes: train and export run again into new directories (older ones stay; delete them
when done). A generated dataset (synth, ml100k) is keyed by its options, which its
directory name carries. Train is skipped when its checkpoint (metrics.json, written last)
exists under the key; export when its bundle (manifest.json: the directory is renamed into
place whole) exists and train did not run. With --redis, the dataset's users are loaded into
the feature store unless `mvke:features-loaded:<dataset>-<users fingerprint>` records that
these very users files were loaded, then the bundle is published unless its version (a
hash of its files) is already the active one; features come first so that publish checks
the bundle against the store it will read (mvke/runtime/store_schema.py). `--force STEP`
(repeatable; `all`) redoes a step whatever its key; a forced train also redoes export.
Every key carries the prefix of --key-prefix / $MVKE_KEY_PREFIX, as the service's keys do.
Progress goes to stderr; the last line on stdout is a JSON summary (paths, version, steps run).
With --step-log FILE the steps' own reports (the JSON each command prints) go to FILE instead
of stderr, so the terminal shows progress only (the main job does this).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mvke.runtime.fingerprint import config_fingerprint, tree_fingerprint
from mvke.runtime.keys import add_key_prefix_option, key_prefix

EXTRA = "train,export"
STEPS = ("data", "train", "export", "features", "publish")


@dataclass
class PipelineConfig:
    data_source: str                 # synth | ml100k | a dataset directory
    model: str = "mvke-mt"
    work: str = ".mvke-local"
    redis: str | None = None         # publish + feature store; None: stop after export
    users: int = 20_000              # synth only
    tags: int = 1_780                # synth only: the tag catalogue
    epochs: int = 5
    lr: float | None = None          # None: `mvke train`'s default
    threads: int | None = None       # torch threads of the training step; None: `mvke train`'s default (2)
    seed: int = 0
    key_prefix: str | None = None    # None: $MVKE_KEY_PREFIX, else mvke
    step_log: str | None = None      # the steps' reports go here instead of stderr
    force: tuple[str, ...] = ()      # steps redone whatever their key (STEPS, or "all")


@dataclass
class PipelineResult:
    data: str
    checkpoint: str
    bundle: str
    version: str
    model: str
    test_auc: dict | None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def _command(argv: list[str], log: str | None = None) -> None:
    """One `mvke` command in this process; its report goes to stderr or `log` (stdout carries the summary)."""
    from mvke.cli import main
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log, "a")) if log else sys.stderr
        if log:
            print(f"$ mvke {' '.join(argv)}", file=sink, flush=True)
        stack.enter_context(contextlib.redirect_stdout(sink))
        code = main(argv)
    if code:
        raise RuntimeError(f"`mvke {' '.join(argv)}` failed (exit {code})" + (f"; its report: {log}" if log else ""))


def dataset_dir(cfg: PipelineConfig) -> tuple[Path, list[str] | None]:
    """-> (directory, the `mvke data` arguments that build it, or None for a directory given as is)."""
    work = Path(cfg.work)
    if cfg.data_source == "synth":
        d = work / "data" / (f"synth-{cfg.users}u-s{cfg.seed}" + (f"-t{cfg.tags}" if cfg.tags != 1_780 else ""))
        return d, ["data", "synth", "--out", str(d), "--users", str(cfg.users), "--tags", str(cfg.tags),
                   "--seed", str(cfg.seed)]
    if cfg.data_source == "ml100k":
        d = work / "data" / f"ml100k-s{cfg.seed}"
        return d, ["data", "ml100k", "--out", str(d), "--seed", str(cfg.seed)]
    d = Path(cfg.data_source)
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{d}: not a dataset directory (no meta.json); use synth, ml100k or a directory "
                                "written by `mvke data`")
    return d, None


def dataset_id(data: Path) -> str:
    """Which users these are, for the feature-store marker: the dataset's name and its users files' content."""
    return f"{data.name}-{tree_fingerprint(data / 'users.parquet')[:12]}"


def run_key(cfg: PipelineConfig, data: Path) -> str:
    """12 hex: the content of every dataset file and the training options (the module docstring)."""
    lr = {"lr": cfg.lr} if cfg.lr is not None else {}   # unset: the keys of runs before --lr are unchanged
    return config_fingerprint(data=tree_fingerprint(data), model=cfg.model, epochs=cfg.epochs, seed=cfg.seed, **lr)[:12]


def run_dirs(cfg: PipelineConfig, data: Path) -> tuple[Path, Path]:
    """(checkpoint, bundle) directories of this model, dataset content, epochs and seed under --work."""
    run_name = f"{cfg.model}-{data.name}-e{cfg.epochs}-s{cfg.seed}-{run_key(cfg, data)}"
    return Path(cfg.work) / "ckpt" / run_name, Path(cfg.work) / "bundle" / run_name


def forced(cfg: PipelineConfig, name: str) -> bool:
    return name in cfg.force or "all" in cfg.force


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    data, build_data = dataset_dir(cfg)
    ran, skipped = [], []

    def step(name: str, done: bool, message: str, argv: list[str]) -> None:
        if done and not forced(cfg, name):
            skipped.append(name)
            return
        _say(message)
        t0 = time.perf_counter()
        _command(argv, cfg.step_log)
        print(f"    {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        ran.append(name)

    if build_data is None:
        skipped.append("data")        # a directory given as is: nothing to build
    else:
        step("data", (data / "meta.json").exists(), f"generating the {cfg.data_source} dataset -> {data}", build_data)
    ckpt, bundle = run_dirs(cfg, data)   # keyed by the data's content: after the data step
    step("train", (ckpt / "metrics.json").exists(), f"training {cfg.model} ({cfg.epochs} epochs) -> {ckpt}",
         ["train", "--data", str(data), "--model", cfg.model, "--out", str(ckpt), "--epochs", str(cfg.epochs),
          "--seed", str(cfg.seed), *(["--lr", str(cfg.lr)] if cfg.lr is not None else []),
          *(["--threads", str(cfg.threads)] if cfg.threads is not None else [])])
    step("export", (bundle / "manifest.json").exists() and "train" not in ran, f"exporting the ONNX bundle -> {bundle}",
         ["export", str(ckpt), "--out", str(bundle)])
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    if cfg.redis:
        _serve_from_redis(cfg.redis, key_prefix(cfg.key_prefix), data, bundle, version, step)
    metrics = json.loads((ckpt / "metrics.json").read_text())
    return PipelineResult(str(data), str(ckpt), str(bundle), version, cfg.model, metrics.get("test_auc"), ran, skipped)


def _serve_from_redis(url: str, prefix: str, data: Path, bundle: Path, version: str, step) -> None:
    from mvke.runtime.keys import Keys
    from mvke.runtime.redis_client import connect, resolve
    from mvke.runtime.versions import active_version
    keys, where = Keys(prefix), resolve(url).display
    r = connect(url, socket_timeout=30)     # one node or a Redis Cluster, AUTH/TLS from the URL
    try:
        marker = keys.features_loaded(dataset_id(data))
        loaded = bool(r.exists(marker))
        step("features", loaded, f"loading the feature store from {data}",
             ["features", "load", "--data", str(data), "--redis", url, "--key-prefix", prefix])
        r.set(marker, json.dumps({"data": str(data.resolve()), "loaded_at": time.time()}))
        # after the features: publish checks the bundle against the store it will read
        step("publish", active_version(r, keys) == version, f"publishing version {version} to {where} ({keys.active})",
             ["publish", str(bundle), "--redis", url, "--key-prefix", prefix])
    finally:
        r.close()


def _pipeline(a: argparse.Namespace) -> None:
    cfg = PipelineConfig(data_source=a.data_source, model=a.model, work=a.work, redis=a.redis, users=a.users,
                         tags=a.tags, epochs=a.epochs, lr=a.lr, threads=a.threads, seed=a.seed,
                         key_prefix=a.key_prefix, step_log=a.step_log, force=tuple(a.force or ()))
    print(json.dumps(asdict(run_pipeline(cfg))), flush=True)


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="data -> train -> export -> features -> publish (skips steps whose inputs "
                                        "are unchanged)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data-source", required=True, help="synth | ml100k | a dataset directory")
    p.add_argument("--model", default="mvke-mt", metavar="NAME",
                   help="model to train (default mvke-mt; the names: `mvke train --help`)")
    p.add_argument("--redis", help="Redis URL: publish and load the feature store there (without: stop after export); "
                                   "redis+cluster:// for a Redis Cluster, rediss:// for TLS")
    p.add_argument("--work", default=os.environ.get("MVKE_WORK_DIR", ".mvke-local"),
                   help="where data, checkpoints and bundles go (default $MVKE_WORK_DIR or .mvke-local)")
    p.add_argument("--users", type=int, default=20_000, help="synthetic users (synth only; default 20000)")
    p.add_argument("--tags", type=int, default=1_780, help="tags in the catalogue (synth only; default 1780)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--lr", type=float, help="learning rate (default: `mvke train`'s, 0.002)")
    p.add_argument("--threads", type=int, help="torch threads for training (default: `mvke train`'s, 2)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    add_key_prefix_option(p)
    p.add_argument("--step-log", metavar="FILE", help="append the steps' reports (JSON) to FILE instead of stderr")
    p.add_argument("--force", action="append", choices=(*STEPS, "all"), metavar="STEP",
                   help=f"redo STEP even when its inputs are unchanged (repeatable; one of {', '.join(STEPS)}, all)")
    p.set_defaults(func=_pipeline, extra=EXTRA)
