"""`mvke <command> --help` explains every argument, and the model names are listed where a model is chosen."""
from __future__ import annotations

import argparse

from mvke.cli import build_parser
from mvke.training.cli import MODEL_NAMES


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every leaf command, e.g. (("features", "load"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _subparsers(child, path + (name,))


def test_every_argument_of_every_command_has_help():
    missing = []
    commands = list(_subparsers(build_parser()))
    assert len(commands) >= 13   # data x4, train, experiment, export, publish, models, features load, serve, tag-all, pipeline
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"mvke {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help text:\n" + "\n".join(missing)


def test_model_names_are_listed_and_match_the_registry():
    from mvke.models import MODELS
    assert tuple(MODELS) == MODEL_NAMES
    train = dict(_subparsers(build_parser()))[("train",)]
    model = next(a for a in train._actions if a.dest == "model")
    assert all(name in model.help for name in MODEL_NAMES)


def test_commands_that_touch_redis_take_a_key_prefix():
    commands = dict(_subparsers(build_parser()))
    for path in [("publish",), ("promote",), ("models",), ("features", "load"), ("tag-all",), ("pipeline",)]:
        options = {o for a in commands[path]._actions for o in a.option_strings}
        assert "--key-prefix" in options, path


def test_every_command_describes_itself_and_serve_takes_redis_like_the_others():
    """Issue 28 §6: no command's --help is a bare usage line; serve, promote and api-key name the environment
    they read; serve takes --redis and --key-prefix as every other command that touches Redis."""
    commands = dict(_subparsers(build_parser()))
    bare = [" ".join(path) for path, p in commands.items() if not (p.description or "").strip()]
    assert not bare, f"commands without a description: {bare}"
    options = {o for a in commands[("serve",)]._actions for o in a.option_strings}
    assert {"--redis", "--key-prefix"} <= options
    serve = commands[("serve",)].format_help()
    from service.settings import Settings
    for name in Settings.model_fields:          # every setting the service reads is listed
        assert (f"MVKE_{name.upper()}" if name != "redis_url" else "REDIS_URL") in serve, name
    assert "REDIS_URL" in commands[("promote",)].format_help()
    api_key = commands[("api-key",)].format_help()
    assert "MVKE_API_KEYS_FILE" in api_key and "MVKE_API_KEYS" in api_key


def test_serve_options_reach_the_workers_environment(monkeypatch):
    """`mvke serve --redis URL --key-prefix P` sets what the worker processes read (no server started)."""
    import os

    import uvicorn

    from mvke.cli import main
    for name in ("REDIS_URL", "MVKE_KEY_PREFIX", "MVKE_WORKERS"):
        monkeypatch.setenv(name, "")   # recorded, so what the command sets is undone after the test
        monkeypatch.delenv(name)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw, env={k: os.environ.get(k) for k in
                                                                              ("REDIS_URL", "MVKE_KEY_PREFIX")}))
    assert main(["serve", "--redis", "redis://example:6390/0", "--key-prefix", "acme", "--workers", "1"]) == 0
    assert seen["env"] == {"REDIS_URL": "redis://example:6390/0", "MVKE_KEY_PREFIX": "acme"} and seen["workers"] == 1
