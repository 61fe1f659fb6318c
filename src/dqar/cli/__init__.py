"""The `dqar` command: one module per subcommand, imported only when that subcommand runs.

Each subcommand module defines `add_arguments(parser)` (argparse only, no heavy imports, so
`dqar --help` stays fast) and `run(args) -> int`. Bad input raises `UsageError` (or a ValueError
from a config boundary) and becomes exit code 2 with a one-line message, never a traceback; an OSError the
machine raises while writing (a full disk, a permission) is one line too, with exit code 1.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dqar.cli.generate", "class-conditional sampling to PNGs and a grid, optionally under DQAR"),
    "train-model": ("dqar.cli.train_model", "train the embedded digits DiT and its evaluator"),
    "train-policy": ("dqar.cli.train_policy", "collect traces on the embedded model and train a reuse policy"),
    "bench": ("dqar.cli.bench", "one DQAR configuration against the uncached baseline: speed, memory, quality"),
    "sweep": ("dqar.cli.sweep", "a grid of configurations, one JSON line per point, resumable"),
    "report": ("dqar.cli.report", "Markdown report and plots from sweep results"),
    "sample": ("dqar.cli.sample", "sharded sample generation (torchrun-aware) to PNGs and an ADM .npz"),
}


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def _available_commands() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqar", description="DQAR: attention-output reuse for Diffusion Transformers")
    from dqar import __version__

    parser.add_argument("--version", action="version", version=f"dqar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available_commands().items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from dqar.models.io import WeightsError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, WeightsError, ValueError, FileNotFoundError) as exc:
        print(f"dqar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine refused (a full disk, a permission, a path taken by a folder): one line naming the path,
        # exit 1, since the command line itself was fine.
        print(f"dqar {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dqar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
