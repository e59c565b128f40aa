"""Bad inputs and mismatches across split, train, export, publish, features load, serve, tag-all and
pipeline, each run on two source trees: what the project answered BEFORE a change and what it answers NOW
(issue 28's closing table, docs/results/bad_inputs.md).

    python scripts/bad_inputs.py --before /tmp/before --now . --out docs/results/bad_inputs.md

`--before` is a checkout of the older commit (e.g. `git archive <commit> | tar -x -C /tmp/before`).
Every case runs the tree's own `mvke` command line (`python -m mvke.cli`, PYTHONPATH = that tree) in a
subprocess, against a private redis-server and fresh copies of the inputs; a case prints its exit code
and the line of its output that explains it (the error, the warning or the JSON field that matters).
The fixtures (a tiny synthetic dataset, MovieLens-100K, a 1-epoch nomtl of each, exported) are built
once with the NOW tree. Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
PY = sys.executable


@dataclass
class Case:
    stage: str
    what: str
    run: Callable[["Tree", Path], str]           # (tree, scratch dir) -> "exit N: message"


@dataclass
class Tree:
    root: Path
    redis_url: str
    fixtures: dict[str, Path]
    env: dict[str, str] = field(default_factory=dict)

    def mvke(self, *argv: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        e = {**os.environ, "PYTHONPATH": str(self.root), "REDIS_URL": self.redis_url, **(env or {})}
        return subprocess.run([PY, "-m", "mvke.cli", *argv], capture_output=True, text=True, cwd=self.root,
                              env=e, timeout=timeout)


# ---- helpers -------------------------------------------------------------------------------------------------
def explain(p: subprocess.CompletedProcess, want: str | None = None) -> str:
    """`exit N: <the line that explains it>`: a line containing `want`, else the last error/warning line,
    else the last line of stdout."""
    lines = [x.strip() for x in (p.stderr + "\n" + p.stdout).splitlines() if x.strip()]
    pick = None
    if want:
        pick = next((x for x in lines if want in x), None)
    if pick is None:
        pick = next((x for x in reversed(lines) if x.startswith(("error", "WARNING", "mvke", "usage"))
                     or "Error" in x.split(":")[0]), None)
    if pick is None:
        out = [x.strip() for x in p.stdout.splitlines() if x.strip()]
        pick = out[-1] if out else "(no output)"
    if pick in ("{", "}"):          # a JSON report and nothing else: the command said nothing was wrong
        try:
            doc = json.loads(p.stdout)
            pick = "no error, no warning; report " + json.dumps({k: doc[k] for k in list(doc)[:3]})
        except (ValueError, TypeError):
            pass
    return f"exit {p.returncode}: {short(pick)}"


def short(text: str, n: int = 330) -> str:
    text = text.replace("|", "\\|")
    for tmp in (tempfile.gettempdir() + "/",):
        while tmp in text:
            start = text.index(tmp)
            end = start + len(tmp)
            while end < len(text) and text[end] not in " ,:'\")":
                end += 1
            text = text[:start] + "…/" + Path(text[start:end]).name + text[end:]
    return text if len(text) <= n else text[: n - 1] + "…"


def flush(tree: Tree) -> None:
    import redis
    redis.Redis.from_url(tree.redis_url).flushdb()


def own_variant(tree: Tree, scratch: Path, log=None, users=None, meta=None) -> Path:
    """The own-data example with its log, users table or meta.json changed."""
    from mvke.data.example import example_variant
    return example_variant(tree.fixtures["own"], scratch / "own", log=log, users=users, meta=meta)


def set_cell(df: pd.DataFrame, column: str, row: int, value) -> pd.DataFrame:
    from mvke.data.example import with_value
    return with_value(df, column, row, value)


def split_case(**change) -> Callable[[Tree, Path], str]:
    def run(tree: Tree, scratch: Path) -> str:
        log = own_variant(tree, scratch, **change)
        return explain(tree.mvke("data", "split", "--by-time", str(log), "--out", str(scratch / "out")))
    return run


def dataset_copy(tree: Tree, scratch: Path, users=None, meta=None, train=None) -> Path:
    d = scratch / "data"
    shutil.copytree(tree.fixtures["synth"], d, ignore=shutil.ignore_patterns("_*"))
    if meta:
        (d / "meta.json").write_text(json.dumps(meta(json.loads((d / "meta.json").read_text()))))
    for name, change in (("users.parquet", users), ("train.parquet", train)):
        if change:
            df = pd.read_parquet(d / name)
            pq.write_table(pa.Table.from_pandas(change(df), preserve_index=False), d / name)
    return d


def bad_users(n_bad: int):
    """A users table whose first n_bad users hold `a|b` in their first multi field (-1: every user)."""
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        field = "clicked_tags"
        k = len(df) if n_bad < 0 else n_bad
        df[field] = [["a|b"] if i < k else list(v) for i, v in enumerate(df[field])]
        return df
    return change


def features_case(n_bad: int, *extra: str) -> Callable[[Tree, Path], str]:
    def run(tree: Tree, scratch: Path) -> str:
        flush(tree)
        d = dataset_copy(tree, scratch, users=bad_users(n_bad))
        p = tree.mvke("features", "load", "--data", str(d), "--workers", "1", *extra)
        success = (d / "_features_load" / "_SUCCESS.json").exists()
        return explain(p, "rejected") + f" [_SUCCESS.json written: {'yes' if success else 'no'}]"
    return run


def train_case(**change) -> Callable[[Tree, Path], str]:
    def run(tree: Tree, scratch: Path) -> str:
        d = dataset_copy(tree, scratch, **change)
        return explain(tree.mvke("train", "--data", str(d), "--model", "nomtl", "--epochs", "1", "--out",
                                 str(scratch / "ckpt")))
    return run


# ---- the service ---------------------------------------------------------------------------------------------
class Service:
    def __init__(self, tree: Tree, *extra: str, env: dict | None = None):
        from mvke.localredis import free_port
        self.port = free_port()
        e = {**os.environ, "PYTHONPATH": str(tree.root), "REDIS_URL": tree.redis_url, "MVKE_WORKERS": "1",
             "MVKE_MODEL_POLL_S": "0.2", "MVKE_LOG_LEVEL": "WARNING", **(env or {})}
        self.proc = subprocess.Popen([PY, "-m", "mvke.cli", "serve", "--port", str(self.port), *extra], cwd=tree.root,
                                     env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self, timeout: float = 60, until: Callable[[dict], bool] = lambda d: True) -> dict | None:
        deadline = time.monotonic() + timeout
        doc = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return None
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                doc = r.json()
                if r.status_code == 200 and until(doc):
                    return doc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return doc

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


def _store_and_active(tree: Tree) -> None:
    flush(tree)
    assert tree.mvke("features", "load", "--data", str(tree.fixtures["synth"]), "--workers", "1").returncode == 0
    assert tree.mvke("publish", str(tree.fixtures["synth_bundle"])).returncode == 0


def serve_canary(tree: Tree, scratch: Path) -> str:
    """A bundle of other fields published as a 50% canary (with --force where the tree has it)."""
    _store_and_active(tree)
    p = tree.mvke("publish", str(tree.fixtures["ml_bundle"]), "--canary", "50", "--force")
    if p.returncode == 2 and "unrecognized arguments: --force" in p.stderr:
        p = tree.mvke("publish", str(tree.fixtures["ml_bundle"]), "--canary", "50")
    canary = json.loads(p.stdout)["version"] if p.returncode == 0 else None
    svc = Service(tree)
    try:
        doc = svc.ready(until=lambda d: "canary_version" in d or "canary" in d.get("load_errors", {}))
        users = [str(u) for u in pd.read_parquet(tree.fixtures["synth"] / "users.parquet")["user_id"][:100]]
        answers = [httpx.post(f"{svc.url}/users/{u}/tags", json={"top_k": 3}, timeout=10).json() for u in users]
        on_canary = [a for a in answers if a.get("model_version") == canary]
        distinct = {json.dumps(a["tasks"], sort_keys=True) for a in on_canary}
        sources = {a.get("feature_source") for a in on_canary}
        why = doc.get("load_errors", {}).get("canary", "") if doc else ""
        return (f"HTTP 200: {len(on_canary)} of 100 users answered by the canary ({len(distinct)} distinct answers, "
                f"feature_source {sorted(sources) if sources else '-'}); /readyz canary_version "
                f"{'present' if doc and 'canary_version' in doc else 'absent'}"
                + (f"; load_errors.canary: {short(why, 200)}" if why else ""))
    finally:
        svc.stop()


def serve_forced_active(tree: Tree, scratch: Path) -> str:
    _store_and_active(tree)
    p = tree.mvke("publish", str(tree.fixtures["ml_bundle"]), "--force")
    if p.returncode == 2 and "unrecognized arguments: --force" in p.stderr:
        p = tree.mvke("publish", str(tree.fixtures["ml_bundle"]))
    version = json.loads(p.stdout)["version"]
    svc = Service(tree)
    try:
        doc = svc.ready(until=lambda d: d.get("model_version") == version) or {}
        metrics = httpx.get(svc.url + "/metrics", timeout=5).text
        gauge = next((x for x in metrics.splitlines() if x.startswith('mvke_schema_mismatch{role="active"}')), None)
        return (f"/readyz 200 ready={doc.get('ready')}; schema_mismatch: "
                f"{short(doc['schema_mismatch']['active'], 200) if 'schema_mismatch' in doc else 'absent'}"
                f"; metric: {gauge or 'absent'}")
    finally:
        svc.stop()


def serve_redis_option(tree: Tree, scratch: Path) -> str:
    _store_and_active(tree)
    svc = Service(tree, "--redis", tree.redis_url, env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    try:
        doc = svc.ready(timeout=30)
        if doc is None:
            out = svc.stop()
            return "exit " + str(svc.proc.returncode) + ": " + short([x for x in out.splitlines() if x.strip()][-1])
        return f"/readyz {'200' if doc.get('ready') else '503'}: {short(json.dumps(doc), 160)}"
    finally:
        if svc.proc.poll() is None:
            svc.stop()


def serve_docs_example(tree: Tree, scratch: Path) -> str:
    _store_and_active(tree)
    svc = Service(tree)
    try:
        svc.ready()
        doc = httpx.get(svc.url + "/openapi.json", timeout=10).json()
        user = doc["components"]["schemas"]["TagResponse"]["examples"][0]["user_id"]
        r = httpx.post(f"{svc.url}/users/{user}/tags", json={}, timeout=10)
        return f"example user {user!r}: POST /users/{user}/tags -> {r.status_code}"
    finally:
        svc.stop()


# ---- publish --------------------------------------------------------------------------------------------------
def publish_other(*extra: str) -> Callable[[Tree, Path], str]:
    def run(tree: Tree, scratch: Path) -> str:
        _store_and_active(tree)
        return explain(tree.mvke("publish", str(tree.fixtures["ml_bundle"]), *extra), "refused")
    return run


def publish_tampered(tree: Tree, scratch: Path) -> str:
    flush(tree)
    b = scratch / "bundle"
    shutil.copytree(tree.fixtures["synth_bundle"], b)
    with open(b / "tags.json", "a") as f:
        f.write(" ")
    return explain(tree.mvke("publish", str(b)))


# ---- tag-all ---------------------------------------------------------------------------------------------------
def tag_all_case(n_bad: int) -> Callable[[Tree, Path], str]:
    def run(tree: Tree, scratch: Path) -> str:
        d = dataset_copy(tree, scratch, users=lambda df: bad_types(df, n_bad))
        out = scratch / "tags"
        p = tree.mvke("tag-all", "--bundle", str(tree.fixtures["synth_bundle"]), "--users", str(d / "users.parquet"),
                      "--out", str(out), "--workers", "1", "--no-progress", "--top-k", "3")
        return explain(p, "rejected") + f" [_SUCCESS.json written: {'yes' if (out / '_SUCCESS.json').exists() else 'no'}]"
    return run


def bad_types(df: pd.DataFrame, n_bad: int) -> pd.DataFrame:
    """The first n_bad users (-1: all) with a list in the single-valued field `gender` (tag-all rejects them);
    the others with no gender (a null: the field's OOV id, accepted)."""
    df = df.copy()
    k = len(df) if n_bad < 0 else n_bad
    df["gender"] = [[str(v), "x"] if i < k else None for i, v in enumerate(df["gender"])]
    return df


# ---- pipeline --------------------------------------------------------------------------------------------------
def pipeline_changed_byte(tree: Tree, scratch: Path) -> str:
    d = scratch / "data"
    shutil.copytree(tree.fixtures["synth"], d, ignore=shutil.ignore_patterns("_*"))
    argv = ["pipeline", "--data-source", str(d), "--model", "nomtl", "--epochs", "1", "--work", str(scratch / "work")]
    first = tree.mvke(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    path = d / "train.parquet"
    raw = path.read_bytes()
    at = raw.rfind(b"parquet-cpp-arrow")
    path.write_bytes(raw[:at] + b"P" + raw[at + 1:])      # one byte, same size
    second = tree.mvke(*argv)
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    return f"exit {second.returncode}: ran {summary['ran']}, skipped {summary['skipped']}"


def pipeline_force(tree: Tree, scratch: Path) -> str:
    d = scratch / "data"
    shutil.copytree(tree.fixtures["synth"], d, ignore=shutil.ignore_patterns("_*"))
    argv = ["pipeline", "--data-source", str(d), "--model", "nomtl", "--epochs", "1", "--work", str(scratch / "work")]
    tree.mvke(*argv)
    p = tree.mvke(*argv, "--force", "export")
    if p.returncode:
        return explain(p)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return f"exit 0: ran {summary['ran']}, skipped {summary['skipped']}"


# ---- the cases -------------------------------------------------------------------------------------------------
def cases() -> list[Case]:
    ts = "timestamp"
    return [
        Case("split", "label value 2 in one row of `conversion`",
             split_case(log=lambda d: set_cell(d, "conversion", 5, 2))),
        Case("split", "a null `click` label in one row", split_case(log=lambda d: set_cell(d, "click", 3, None))),
        Case("split", "labels written as strings '0'/'1'", split_case(log=lambda d: d.assign(click=d.click.astype(str)))),
        Case("split", "timestamps in milliseconds", split_case(log=lambda d: d.assign(**{ts: d[ts].astype("int64") // 1000}))),
        Case("split", "timestamps in microseconds", split_case(log=lambda d: d.assign(**{ts: d[ts].astype("int64")}))),
        Case("split", "one unparseable date string ('2024-13-45')",
             split_case(log=lambda d: d.assign(**{ts: d[ts].astype(str)}).pipe(set_cell, ts, 7, "2024-13-45"))),
        Case("split", "a null user id in the log", split_case(log=lambda d: set_cell(d, "user_id", 4, None))),
        Case("split", "user ids as floats in the log and users.parquet",
             split_case(log=lambda d: d.assign(user_id=d.user_id.str[4:].astype(float)),
                        users=lambda u: u.assign(user_id=u.user_id.str[4:].astype(float)))),
        Case("split", "user ids integers in users.parquet, strings in the log",
             split_case(users=lambda u: u.assign(user_id=u.user_id.str[4:].astype(int)))),
        Case("split", "a list item containing `\\|` in a users.parquet multi field",
             split_case(users=lambda u: set_cell(u, "clicked_tags", 9, ["sports/tag01", "a|b"]))),
        Case("split", "meta.json kind 'categorical'",
             split_case(meta=lambda m: {**m, "fields": {**m["fields"], "gender": "categorical"}})),
        Case("split", "a tag listed twice in meta.json", split_case(meta=lambda m: {**m, "tags": m["tags"] + m["tags"][:1]})),
        Case("split", "max_lens for a cat field", split_case(meta=lambda m: {**m, "max_lens": {"gender": 3}})),
        Case("split", "2 impressions with an empty tag list",
             split_case(log=lambda d: set_cell(set_cell(d, "tags", 0, []), "tags", 1, []))),
        Case("split", "a tag not in the catalogue (control: unchanged)",
             split_case(log=lambda d: set_cell(d, "tags", 2, ["sports/tag99"]))),
        Case("split", "no time column (control: unchanged)", split_case(log=lambda d: d.drop(columns=[ts]))),
        Case("train", "dataset whose meta.json has kind 'categorical'",
             train_case(meta=lambda m: {**m, "fields": {**m["fields"], "gender": "categorical"}})),
        Case("train", "dataset with a label 2 in train.parquet", train_case(train=lambda d: set_cell(d, "click", 5, 2))),
        Case("train", "--data is not a dataset (control)", lambda t, s: explain(t.mvke("train", "--data", str(s / "none"),
                                                                                        "--out", str(s / "c")))),
        Case("export", "checkpoint directory missing (control)",
             lambda t, s: explain(t.mvke("export", str(s / "nockpt"), "--out", str(s / "b")))),
        Case("publish", "bundle of other fields and catalogue (MovieLens) onto a store of synthetic users",
             publish_other()),
        Case("publish", "the same as a 50% canary", publish_other("--canary", "50")),
        Case("publish", "the same with --force", publish_other("--force")),
        Case("publish", "a bundle with a file changed after export (control)", publish_tampered),
        Case("publish", "--canary 150 (control)", lambda t, s: explain(t.mvke("publish", str(t.fixtures["synth_bundle"]),
                                                                              "--canary", "150"))),
        Case("features load", "every user rejected (`\\|` in a list item)", features_case(-1)),
        Case("features load", "12 of 400 users rejected (3%)", features_case(12)),
        Case("features load", "2 of 400 users rejected (0.5%, under the 1% default)", features_case(2)),
        Case("features load", "--max-reject-rate 2", features_case(0, "--max-reject-rate", "2")),
        Case("features load", "a directory without meta.json (control)",
             lambda t, s: explain(t.mvke("features", "load", "--data", str(s)))),
        Case("serve", "the other-fields bundle as a 50% canary (published; forced where publish refuses)", serve_canary),
        Case("serve", "the other-fields bundle active (forced where publish refuses)", serve_forced_active),
        Case("serve", "`mvke serve --redis URL` (REDIS_URL points nowhere)", serve_redis_option),
        Case("serve", "the /docs and /ui example user (synthetic store: its ids happen to include the demo's "
                      "u0000042)", serve_docs_example),
        Case("tag-all", "every user rejected (a list in a cat field)", tag_all_case(-1)),
        Case("tag-all", "12 of 400 users rejected (3%)", tag_all_case(12)),
        Case("pipeline", "one byte of train.parquet changed, rerun", pipeline_changed_byte),
        Case("pipeline", "--force export", pipeline_force),
    ]


LEAD_ROWS = [
    ("serve (§5, lead)", "request `features` with a string where a list is expected"),
    ("serve (§5, lead)", "`\"features\": {}`"),
    ("serve (§5, lead)", "a stored user lacking some of the model's fields (`missing_fields`)"),
    ("serve (§5, lead)", "/tags:batch with one user's `top_k: 0`"),
]


# ---- fixtures and main ------------------------------------------------------------------------------------------
def build_fixtures(now: Path, work: Path) -> dict[str, Path]:
    """Built once into `work` (kept: --fixtures DIR reuses them)."""
    env = {**os.environ, "PYTHONPATH": str(now)}

    def mvke(*argv: str) -> None:
        print(f"fixtures: mvke {' '.join(argv)}", file=sys.stderr, flush=True)
        p = subprocess.run([PY, "-m", "mvke.cli", *argv], cwd=now, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"mvke {' '.join(argv)}: {p.stderr[-2000:]}")

    f = {"own": now / "docs" / "examples" / "own-data", "synth": work / "synth", "ml": work / "ml",
         "synth_bundle": work / "synth_bundle", "ml_bundle": work / "ml_bundle"}
    if (f["synth_bundle"] / "manifest.json").exists() and (f["ml_bundle"] / "manifest.json").exists():
        return f
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([PY, "-c", "import sys; from mvke.data.synthetic import SynthConfig, generate; "
                    "generate(SynthConfig(users=400, tags=60, ads=300, categories=12, segments=4, seed=0), sys.argv[1], "
                    "progress=False)", str(f["synth"])], cwd=now, env=env, check=True)
    mvke("data", "ml100k", "--out", str(f["ml"]))
    for name in ("synth", "ml"):      # one epoch: these models only need to exist, not to be good
        mvke("train", "--data", str(f[name]), "--model", "nomtl", "--epochs", "1", "--out", str(work / f"{name}_ckpt"))
        mvke("export", str(work / f"{name}_ckpt"), "--out", str(f[f"{name}_bundle"]))
    return f


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Bad inputs and mismatches: before and after issue 28", "",
             f"Each row ran `{meta['command']}`: the same input through the `mvke` command line of two trees, "
             f"BEFORE = commit {meta['before_commit']} (the tree this issue started from), NOW = commit "
             f"{meta['now_commit']} (branch wt-checks). `exit N` is the command's exit status, then the line "
             "of its output that explains it (the error, the warning or the JSON field that matters); serve rows "
             "are HTTP answers of a running `mvke serve`. Temporary paths are shortened to `…/name`. Rows marked "
             "control were already right and stay so. Generated by scripts/bad_inputs.py on "
             f"{meta['date']} ({meta['cpu']}; load average {meta['load']}).", "",
             "| # | stage | input | BEFORE | NOW |", "|---:|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['stage']} | {r['what']} | {r['before']} | {r['now']} |")
    for stage, what in LEAD_ROWS:
        lines.append(f"| - | {stage} | {what} | lead | lead |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--now", default=Path("."), type=Path)
    p.add_argument("--out", type=Path, help="markdown table to write (default: print)")
    p.add_argument("--only", help="run only the cases whose stage or text contains this")
    p.add_argument("--before-commit", default="?")
    p.add_argument("--fixtures", type=Path, help="keep the built fixtures here and reuse them (default: a temp dir)")
    a = p.parse_args()
    sys.path.insert(0, str(a.now.resolve()))
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a killed run still stops its redis-server
    from mvke.localredis import LocalRedis
    work = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    redis_server = LocalRedis().start()
    try:
        fixtures = build_fixtures(a.now.resolve(), (a.fixtures or work / "fixtures").resolve())
        trees = {"before": Tree(a.before.resolve(), redis_server.url, fixtures),
                 "now": Tree(a.now.resolve(), redis_server.url, fixtures)}
        rows = []
        for case in cases():
            if a.only and a.only not in case.stage + case.what:
                continue
            row = {"stage": case.stage, "what": case.what}
            for side, tree in trees.items():
                scratch = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
                try:
                    row[side] = case.run(tree, scratch)
                except Exception as e:   # noqa: BLE001 - a case that breaks the harness is reported, not fatal
                    row[side] = f"harness error: {short(f'{type(e).__name__}: {e}', 200)}"
                print(f"[{side}] {case.stage}: {case.what}: {row[side]}", file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    now_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.now, capture_output=True,
                                text=True).stdout.strip()
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    meta = {"command": "python scripts/bad_inputs.py --before BEFORE_TREE --now .", "before_commit": a.before_commit,
            "now_commit": now_commit or "?", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": f"{os.cpu_count()} cores, {cpu}, shared with other work",
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    text = render(rows, meta)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
