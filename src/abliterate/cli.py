"""The `abliterate` command: mounts the commands; an AbliterateError becomes one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .commands import apply, chat, convert, directions, eval, export_onnx, inspect, run, steer, web
from .errors import AbliterateError

COMMANDS = (run, directions, apply, convert, export_onnx, eval, steer, inspect, chat, web)  # each mounts its own subcommands


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


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so every atomic write removes its temporary output."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return args.func(args)
    except AbliterateError as e:
        print(f"abliterate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("abliterate: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    except Stopped as e:
        print(f"abliterate: stopped by {signal.Signals(e.signum).name}; unfinished outputs were removed",
              file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
