"""Import graph of the project's own modules: floors, upward imports, cycles.

`python scripts/import_graph.py [ROOT] [--json]` reads every .py file of the stage folders
with `ast` (no import is executed), records each `import` / `from ... import` of a project
module (module level and inside functions alike: a lazy import is still a dependency), and
reports:

* edges: (importer module, imported module) pairs;
* upward imports: edges from a lower floor to a higher one, or between the two side-by-side
  stages (service <-> batch); the floors are those of docs/ARCHITECTURE.md:
    0 mvke.runtime (+ the small mvke/*.py modules: cli, pipeline, localredis, and the old
      mvke.features), 1 mvke.data | mvke.models, 2 mvke.training, 3 model_export,
      4 service | batch, 5 loadtest;
* forbidden imports: service/ and batch/ importing anything but mvke.runtime (and themselves),
  mvke.runtime importing any other project module, loadtest/ importing service/ or batch/;
* cycles: strongly connected components of more than one module (module graph), and of the
  stage graph (stage = floor folder).

The same rules are enforced in CI by import-linter (pyproject.toml, tests/test_layers.py);
this script only counts, so it also runs on an old commit for a before/after comparison.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

PACKAGES = ("mvke", "model_export", "service", "batch", "loadtest")
# (module prefix, floor, stage); the longest matching prefix wins
FLOORS = [
    ("mvke", 0, "mvke"), ("mvke.runtime", 0, "runtime"),
    ("mvke.data", 1, "data"), ("mvke.models", 1, "models"), ("mvke.training", 2, "training"),
    ("model_export", 3, "model_export"), ("service", 4, "service"), ("batch", 4, "batch"),
    ("loadtest", 5, "loadtest"),
]
SIDE_BY_SIDE = {frozenset({"service", "batch"})}
# Stages that may import only these stages (besides themselves); mvke.features is where the
# feature schema lived before mvke/runtime existed (counted as the ground floor it now is).
ONLY_FROM = {"service": {"runtime"}, "batch": {"runtime"}, "runtime": set()}
NEVER_FROM = {"loadtest": {"service", "batch"}}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> tuple[int, str]:
    best = max((p for p in FLOORS if module == p[0] or module.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _walk_runtime(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            # the longest known module the name starts with (`from a.b import c` -> a.b.c or a.b)
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != module:
                out.add(n)
    return out


def _walk_runtime(tree: ast.AST):
    """ast.walk, minus `if TYPE_CHECKING:` blocks (annotations only; nothing is imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(root, p): p for pkg in PACKAGES if (root / pkg).is_dir()
             for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    known = set(files)
    edges = {m: {i for i in imports_of(p, m, known) if i in known} for m, p in files.items()}
    # `import a.b.c` also imports the packages a and a.b: only their __init__ matters, and those
    # are empty or import downward; keep the graph to the named modules.
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of size > 1."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def analyse(root: Path) -> dict:
    edges = graph(root)
    upward = []
    for a, targets in sorted(edges.items()):
        fa, sa = floor_of(a)
        for b in sorted(targets):
            fb, sb = floor_of(b)
            if fb > fa or frozenset({sa, sb}) in SIDE_BY_SIDE:
                upward.append((a, b))
    forbidden = []
    for a, targets in sorted(edges.items()):
        sa = floor_of(a)[1]
        for b in sorted(targets):
            sb = floor_of(b)[1]
            if sb == sa or b == "mvke.features":
                continue
            if (sa in ONLY_FROM and sb not in ONLY_FROM[sa]) or sb in NEVER_FROM.get(sa, ()):
                forbidden.append((a, b))
    stage_edges: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            sa, sb = floor_of(a)[1], floor_of(b)[1]
            if sa != sb:
                stage_edges.setdefault(sa, set()).add(sb)
    return {"modules": len(edges), "edges": sum(len(t) for t in edges.values()),
            "upward_imports": [f"{a} -> {b}" for a, b in upward],
            "forbidden_imports": [f"{a} -> {b}" for a, b in forbidden],
            "module_cycles": strongly_connected(edges),
            "stage_cycles": strongly_connected(stage_edges),
            "stage_edges": {k: sorted(v) for k, v in sorted(stage_edges.items())}}


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1]).resolve()
    res = analyse(root)
    if "--json" in argv:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{root}: {res['modules']} modules, {res['edges']} import edges")
    print(f"upward imports: {len(res['upward_imports'])}")
    for e in res["upward_imports"]:
        print(f"  {e}")
    print(f"forbidden imports (service/batch beyond mvke.runtime, loadtest into service/batch): "
          f"{len(res['forbidden_imports'])}")
    for e in res["forbidden_imports"]:
        print(f"  {e}")
    print(f"module cycles: {len(res['module_cycles'])}")
    for c in res["module_cycles"]:
        print(f"  {' <-> '.join(c)}")
    print(f"stage cycles: {len(res['stage_cycles'])}")
    for c in res["stage_cycles"]:
        print(f"  {' <-> '.join(c)}")
    print("stage -> stages it imports:")
    for k, v in res["stage_edges"].items():
        print(f"  {k:13} -> {', '.join(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
