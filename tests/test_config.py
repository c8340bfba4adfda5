"""Defaults live in one place: every command-line option comes from a field of a config.py dataclass."""

import argparse
from dataclasses import MISSING, fields

from abliterate.cli import build_parser


def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_comes_from_a_config_field_with_the_same_default_and_help():
    seen = 0
    for name, p in subcommands().items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert hasattr(action, "config"), f"{name} {action.option_strings or action.dest}: not from config.py"
            cls, field_name = action.config
            field = next(f for f in fields(cls) if f.name == field_name)
            default = None if field.default is MISSING else field.default
            if not field.metadata["positional"]:
                assert action.default == default, (name, field_name, action.default, default)
            assert action.help.startswith(field.metadata["help"].split("%")[0]), (name, field_name)
            assert action.help.count("(default:") <= 1, (name, field_name, action.help)
            seen += 1
    assert seen > 150  # every command's options were looked at


def test_help_shows_each_default_once_and_renders():
    for name, p in subcommands().items():
        text = p.format_help()
        assert "(default: None)" not in text, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.help and action.default not in (None, False) and not action.required and action.option_strings:
                assert "default" in action.help, (name, action.dest)
