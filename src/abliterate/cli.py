"""The `abliterate` command: mounts the commands; an AbliterateError becomes one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import apply, chat, convert, directions, eval, inspect, run, steer
from .errors import AbliterateError

COMMANDS = (run, directions, apply, convert, eval, steer, inspect, chat)  # each mounts its own subcommands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description="Find the refusal direction of a language model, remove it, prove it, save it.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the results")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.mount(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except AbliterateError as e:
        print(f"abliterate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abliterate: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
