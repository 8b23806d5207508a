"""The ``fused-optim`` command: ``bench``, ``verify`` and ``demo``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them together. ``python -m fused_optim ...`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._extras import MissingExtraError

SUBCOMMANDS = {
    "bench": ("fused_optim.bench", "time optimizer steps against torch.optim and the roofline"),
    "verify": ("fused_optim.verify", "check parity with torch.optim on this device"),
    "demo": ("fused_optim.demo", "train a small model with torch.optim and fused_optim"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-optim",
        description="Fused SGD / Adam / AdamW for PyTorch: benchmarks, parity checks, a demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MissingExtraError as error:
        print(f"fused-optim {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
