"""argparse options built from the dataclasses of `config.py`: the one place defaults and help live."""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, fields, replace
from pathlib import Path

from ..config import RunConfig
from ..errors import AbliterateError
from ..export.files import check_output
from ..export.outputs import is_gguf

# Which RunConfig fields each command takes (the rest keep their defaults).
MODEL = ("device", "dtype", "allow_pickle", "trust_remote_code", "arch_spec", "batch_size")
PROMPTS = ("harmful", "harmless", "column", "n_train", "n_select", "system_prompt", "plain_prompts", "seed")
SELECT = ("positions", "projected", "layer", "min_layer_frac", "max_layer_frac", "select_kl_max")
STREAM = ("stream", "max_memory")
MAPPED = ("device_map", "device_memory")
EVAL = ("eval_harmful", "eval_harmless", "n_eval_harmful", "n_eval_harmless", "max_new_tokens", "kl_tokens",
        "system_prompt", "plain_prompts", "column")
SAVE = ("shard_size", "force", "gguf_type", "gguf_fallback_type")
CAPABILITY = ("capability", "capability_dev", "capability_shots", "capability_protocol", "tasks", "tasks_limit")
LONG = ("long_tokens", "n_long")
JUDGE = ("judge", "judge_calibration")
FORMAT = ("system_prompt", "plain_prompts")
ALL = tuple(f.name for f in fields(RunConfig))


def add_options(parser: argparse.ArgumentParser, cls, names=None) -> None:
    """One argparse option per field of dataclass `cls` (those in `names`, if given), from its metadata."""
    hints = typing.get_type_hints(cls)
    wanted = None if names is None else set(names)
    for f in fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        meta, kind = f.metadata, hints[f.name]
        if meta["output"]:  # this command writes there: check_outputs looks at it before any model loads
            parser.set_defaults(_outputs={**(parser.get_default("_outputs") or {}), f.name: meta["output"]})
        default = None if f.default is MISSING else f.default
        help_ = meta["help"]
        if meta["positional"]:
            parser.add_argument(f.name, help=help_).config = (cls, f.name)
            continue
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        kw: dict = {"dest": f.name, "help": help_}
        if kind is bool:
            parser.add_argument(*flags, action="store_true", **kw).config = (cls, f.name)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if typing.get_origin(base) is list:
            base = typing.get_args(base)[0]
        if meta["required"]:
            kw["required"] = True
        elif default is not None and "default" not in help_:
            kw["help"] = f"{help_} (default: {default})".replace("%", "%%").replace("%%%%", "%%")
        if meta.get("const") is not None:
            kw |= {"nargs": "?", "const": meta["const"]}
        action = parser.add_argument(*flags, type=base, default=default, metavar=f.name.upper(),
                                     action="append" if meta["many"] else "store", **kw)
        action.config = (cls, f.name)  # where the option came from: tests check every option has one


def check_outputs(args: argparse.Namespace) -> None:
    """Every path the command will write (the config fields marked `output`), checked before any model loads by
    the one rule of export.files.check_output: never an input of the command, never over an existing output
    without --force, in a folder that exists (a model directory's parents are made) and can be written."""
    outputs = getattr(args, "_outputs", None) or {}
    given = {k: v for k, v in vars(args).items() if k in outputs and isinstance(v, str)}
    inputs = tuple(Path(v).expanduser() for k, v in vars(args).items()
                   if isinstance(v, str) and k not in outputs and v and Path(v).expanduser().exists())
    force = bool(getattr(args, "force", False))
    for name, path in given.items():
        kind = "file" if outputs[name] == "file" or is_gguf(path) else "dir"
        check_output(path, inputs=inputs, force=force, kind=kind)
    if len(set(map(str, (Path(p).expanduser().resolve() for p in given.values())))) < len(given):
        raise AbliterateError(f"two outputs name the same path ({', '.join(given.values())}); give each its own")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a command line: its given fields over the defaults, checked (and every number given to
    the command's own options finite: nan passes every comparison)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise AbliterateError(f"--{name.replace('_', '-')} {value} is not a finite number; give a number")
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    cfg = replace(RunConfig(), **given).check()
    check_outputs(args)
    return cfg


def options(args: argparse.Namespace, cls):
    """The command's own options (dataclass `cls`) from a parsed command line."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
