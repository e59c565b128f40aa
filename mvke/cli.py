"""`mvke` command line: the subcommands of every stage, found through entry points.

Each stage declares a `register(subparsers)` function in pyproject.toml under
`[project.entry-points."mvke.commands"]` (data, train, export, serve, tag-all,
pipeline); this module imports none of them, so the ground floor depends on no
stage. A stage's command module imports only the standard library at import
time; its handlers import the heavy packages (torch, onnxruntime, fastapi, ray)
when they run, and each subcommand names the pyproject extra it needs
(`set_defaults(extra=...)`). Running a command whose extra is not installed
prints a one-line hint naming that extra; a stage whose command module cannot
be loaded at all still shows up, as a command that says why.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

COMMANDS_GROUP = "mvke.commands"
HELP_ORDER = ("data", "train", "export", "serve", "tag-all", "pipeline")   # stages in pipeline order
PROJECT_PACKAGES = {"mvke", "model_export", "service", "batch", "loadtest"}


def _unavailable(sub, ep: EntryPoint, error: Exception) -> None:
    """A stand-in for a stage whose command module failed to load: the command exists and says why."""
    why = f"{type(error).__name__}: {error}"
    p = sub.add_parser(ep.name, help=f"(unavailable: {why})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def explain(a: argparse.Namespace) -> None:
        raise RuntimeError(f"the `{ep.name}` commands ({ep.value}) could not be loaded: {why}")
    p.set_defaults(func=explain, extra=None)


def stage_entry_points() -> list[EntryPoint]:
    """The `mvke.commands` entry points of the installed distribution; from a source tree that is not
    installed (`PYTHONPATH=.`), the same declarations read from its pyproject.toml."""
    found = list(entry_points(group=COMMANDS_GROUP))
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not found and pyproject.exists():
        import tomllib
        table = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {}).get(COMMANDS_GROUP, {})
        found = [EntryPoint(name, value, COMMANDS_GROUP) for name, value in table.items()]
    order = {name: i for i, name in enumerate(HELP_ORDER)}
    return sorted(found, key=lambda e: (order.get(e.name, len(order)), e.name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mvke", description="MVKE user tagging: data, training, export, serving")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in stage_entry_points():
        try:
            register = ep.load()
        except Exception as e:  # never drop a stage silently
            _unavailable(sub, ep, e)
            continue
        register(sub)
    return p


def missing_extra_hint(command: str, extra: str | None, error: ModuleNotFoundError) -> str:
    install = f"pip install 'mvke[{extra}]'" if extra else "reinstall mvke"
    return f"error: `mvke {command}` needs the package {error.name!r}, which is not installed: {install}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in PROJECT_PACKAGES:
            raise   # our own module is missing: a bug, not an extra to install
        print(missing_extra_hint(args.command, getattr(args, "extra", None), e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from mvke.runtime.redis_client import REDIS_ERRORS, describe_error
        if not isinstance(e, REDIS_ERRORS):
            raise
        # Redis down, full (maxmemory), wrong password...: one line, not a traceback
        print(f"error: Redis: {describe_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
