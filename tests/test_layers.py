"""The floors of docs/ARCHITECTURE.md hold: import-linter's contracts (pyproject.toml,
[tool.importlinter]) are kept, and scripts/import_graph.py counts no upward import, no
forbidden import and no cycle (the same rules, counted independently with `ast`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [shutil.which("lint-imports") or "lint-imports"]
    out = subprocess.run(cmd + ["--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "6 kept" in out.stdout, out.stdout[-2000:]


def test_import_graph_has_no_upward_import_and_no_cycle():
    out = subprocess.run([sys.executable, "scripts/import_graph.py", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    res = json.loads(out.stdout)
    assert res["modules"] > 50 and res["edges"] > 100          # it did read the tree
    assert res["upward_imports"] == [] and res["forbidden_imports"] == []
    assert res["module_cycles"] == [] and res["stage_cycles"] == []
    assert res["stage_edges"]["service"] == ["runtime"] and res["stage_edges"]["batch"] == ["runtime"]
