"""The `gptoss-jax` command line: `gptoss-jax info CONFIG`, and the subcommands later modules add."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    """Prints a config and its parameter counts (from declared shapes: nothing is allocated)."""
    from gptoss_jax.config import load_config
    from gptoss_jax.params import count_params

    config = load_config(args.config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "layer_types":
            value = f"{config.num_layer_pairs} x (sliding, full)"
        print(f"{field.name:>28}: {value}")
    counts = count_params(config)
    print(f"{'parameters':>28}: {_billions(counts['total'])} total, {_billions(counts['active'])} active per token")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a config and its parameter counts")
    info.add_argument("config", help="built-in name (gpt-oss-20b, gpt-oss-120b, tiny-a, ...), config.json or checkpoint dir")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"gptoss-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
