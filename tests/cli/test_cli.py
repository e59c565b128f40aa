"""The `mvke` command: subcommands found through entry points, hints for missing extras.

mvke/cli.py imports no stage; every stage registers its commands under the entry point group
`mvke.commands` (pyproject.toml). A command whose extra is not installed prints one line naming
the extra; a stage whose command module cannot be loaded is shown, never dropped.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import mvke.cli
from mvke.cli import COMMANDS_GROUP, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
STAGE_COMMANDS = {"data", "train", "experiment", "tune", "export", "publish", "promote", "models", "features", "serve",
                  "api-key", "tag-all", "pipeline", "cycle", "events"}


def _commands(parser) -> dict:
    sub = next(a for a in parser._actions if a.dest == "command")
    return dict(sub.choices)


def test_every_stage_registers_its_commands_with_its_extra():
    commands = _commands(build_parser())
    assert set(commands) == STAGE_COMMANDS
    extras = {name: p.get_default("extra") for name, p in commands.items() if p.get_default("extra")}
    assert extras["serve"] == "service" and extras["tag-all"] == "batch" and extras["train"] == "train"
    assert extras["tune"] == "train"
    assert extras["publish"] == "export" and extras["pipeline"] == "train,export"
    assert build_parser().parse_args(["serve", "--port", "9"]).func.__module__ == "service.cli"


def test_a_source_tree_without_install_reads_pyproject(monkeypatch):
    """PYTHONPATH=. without `pip install`: no entry points in any installed metadata, same commands."""
    monkeypatch.setattr(mvke.cli, "entry_points", lambda group: [])
    assert set(_commands(build_parser())) == STAGE_COMMANDS


def test_a_stage_that_cannot_load_is_shown_and_says_why(monkeypatch, capsys):
    real = mvke.cli.stage_entry_points()
    broken = EntryPoint("broken", "no_such_stage_module.cli:register", COMMANDS_GROUP)
    monkeypatch.setattr(mvke.cli, "stage_entry_points", lambda: [*real, broken])
    assert "broken" in _commands(build_parser())
    assert main(["broken", "anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_stage_module" in err and "could not be loaded" in err


HIDDEN = textwrap.dedent("""
    import importlib.abc, sys
    class Hidden(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {hidden!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Hidden())
    from mvke.cli import main
    sys.exit(main({argv!r}))
""")


@pytest.mark.parametrize("hidden, argv, extra", [
    ({"uvicorn"}, ["serve", "--port", "1"], "service"),
    ({"torch"}, ["export", "ckpt", "--out", "b"], "export"),
    ({"torch"}, ["train", "--data", "d", "--out", "o"], "train"),
], ids=["serve", "export", "train"])
def test_a_missing_extra_is_a_one_line_hint(hidden, argv, extra):
    code = HIDDEN.format(hidden=tuple(hidden), argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"mvke[{extra}]" in lines[0] and next(iter(hidden)) in lines[0], out.stderr


def test_the_command_line_imports_no_heavy_package():
    """Building the parser loads every stage's command module, but none of torch, fastapi, ray, onnxruntime."""
    code = ("import sys; from mvke.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'ray', 'onnxruntime', "
            "'pandas', 'uvicorn', 'pyarrow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
