"""The `lowbit` command line: quantize a model, then evaluate, run, benchmark, export and
inspect the result.

    lowbit quantize                                  # the built-in default, see `lowbit quantize --help`
    lowbit eval ./smollm2-135m-w3g64                 # perplexity on the Wikipedia evaluation split
    lowbit generate ./smollm2-135m-w3g64 --prompt "The capital of France is"
    lowbit bench                                     # kernel speedups on this machine
    lowbit export ./smollm2-135m-w3g64 --format gptq # a GPTQ v2 directory for other runtimes
    lowbit info ./smollm2-135m-w3g64                 # what a checkpoint holds

Mistakes in the input (flags, missing files, unreadable checkpoints, unreachable
registries: a `lowbit.errors.LowbitError`; an OSError such as a full or read-only
disk; text that is not UTF-8) print one line and exit with status 1 (2 for
malformed flags); any other exception is a bug and keeps its traceback. `--debug`
always shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lowbit._version import __version__
from lowbit.cli import bench, evaluate, export, generate, info, quantize
from lowbit.cli.common import FORMATTER, Parser, is_user_error, one_line
from lowbit.errors import UsageError

# One module per subcommand, each with `add_parser(sub, common)` and `run(args)`.
SUBCOMMANDS = (quantize, evaluate, generate, bench, export, info)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of every error")
    parser = Parser(prog="lowbit", description=__doc__, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in SUBCOMMANDS:
        command.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that start themselves again
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `lowbit info --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        resume = getattr(args, "resume", None)
        print("lowbit: interrupted" + ("; run the same command again to resume" if resume else ""),
              file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(error_line(args.command, exc), file=sys.stderr)
        return 1


def error_line(command: str, exc: BaseException) -> str:
    """The one line of a user error; a setting the command refused points to its --help, as
    argparse's refusals do."""
    if isinstance(exc, UsageError):
        return f"lowbit {command}: error: {one_line(exc)} (see lowbit {command} --help)"
    return f"lowbit: error: {one_line(exc)}"


if __name__ == "__main__":
    sys.exit(main())
