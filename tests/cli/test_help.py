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
