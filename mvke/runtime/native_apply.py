"""The compiled apply command (mvke/runtime/native/mvke_apply.c): `MVKE.APPLY`, a Redis module.

The Lua function of mvke/runtime/event_apply.py is the reference and works on any Redis 7 (a managed
one, a cluster); where a Redis has this module loaded, the applier calls it instead: the same writes
and reply without the Lua interpreter (docs/results/events.md). The Redis servers this project starts
(mvke/localredis.py) load it when it builds: a C compiler (`cc`, or $CC) compiles it once into the
user's cache directory, keyed by the source's hash. No compiler: no module, the function is used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("mvke.events")

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCE = NATIVE_DIR / "mvke_apply.c"
COMMAND = "MVKE.APPLY"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvke"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@lru_cache(maxsize=1)
def module_path() -> Path | None:
    """The module's shared object, compiled if this source has not been yet; None without a compiler
    or when the build fails (said once in the log: the applier then uses the Lua function)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + (NATIVE_DIR / "redismodule.h").read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"mvke_apply-{digest}.so"
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        log.warning("no C compiler: the events' apply runs as the Lua function (MVKE.APPLY not built)")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    build = subprocess.run([cc, "-O2", "-fPIC", "-shared", "-std=gnu99", "-o", tmp, str(SOURCE)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        os.unlink(tmp)
        log.warning("MVKE.APPLY did not build (%s); the Lua function is used: %s", cc, build.stderr[-500:])
        return None
    os.replace(tmp, target)     # whole or not at all: concurrent builds each rename their own file
    return target
