"""The ``diffattn`` command (also ``python -m diffattn``)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffattn", description="Sparse and editable attention for Diffusers video/image models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the attention methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        import diffattn

        print("\n".join(diffattn.methods()))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
