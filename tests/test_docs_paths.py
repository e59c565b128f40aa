"""Every link and every repository path named in README.md and docs/*.md exists (issue 28 §6).

Links: `[text](target)` with a relative target (anchors dropped), resolved from the file's own
folder. Paths: text such as `mvke/runtime/keys.py`, `docs/DEPLOY.md` or `tests/service/` that starts
with a top-level folder of the repository, resolved from the root; `{a,b}` alternatives are
expanded; placeholders (`<...>`, `*`, `...`) and generated output folders are not paths."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("mvke", "service", "batch", "model_export", "loadtest", "docker", "docs", "tests", "scripts", "deploy")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./{-])((?:" + "|".join(TOP) + r")/[\w./{},-]*[\w/}])")
GENERATED = ("loadtest/out",)     # written by a run, not committed


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _expand(path: str) -> list[str]:
    """`mvke/runtime/{model,scoring}.py` -> both paths."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _prose(raw: str) -> bool:
    """`service/batch`: two stages named side by side, not a path."""
    return all(part in TOP for part in raw.strip("/").split("/"))


def _python_name(path: str) -> bool:
    """`batch/audiences.publish`: a function of batch/audiences.py, named as module.function."""
    module, dot, _ = path.rpartition(".")
    return bool(dot) and (ROOT / f"{module}.py").exists()


def broken_references(doc: Path) -> list[str]:
    text = doc.read_text()
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            out.append(f"link {target}")
    for raw in PATH.findall(text):
        if any(c in raw for c in "<>*") or "..." in raw or raw.startswith(GENERATED) or _prose(raw):
            continue
        for path in _expand(raw.rstrip(".,")):
            if not (ROOT / path).exists() and not _python_name(path):
                out.append(f"path {path}")
    return out


def test_every_link_and_path_in_the_docs_exists():
    broken = {str(d.relative_to(ROOT)): b for d in _docs() if (b := broken_references(d))}
    assert not broken, "\n".join(f"{doc}: {', '.join(sorted(set(b)))}" for doc, b in broken.items())


def test_the_checker_finds_a_broken_link_and_path(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [the guide](missing.md) and `mvke/runtime/{keys,nothing}.py`, docs/NOPE.md.\n"
                   "[ok](x.md) [web](https://example.com) `mvke/runtime/keys.py`")
    assert sorted(broken_references(doc)) == ["link missing.md", "path docs/NOPE.md", "path mvke/runtime/nothing.py"]
