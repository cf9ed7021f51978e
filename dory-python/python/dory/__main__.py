"""``python -m dory run package.module:Processor``: run one processor instance."""

from __future__ import annotations

import argparse
import logging
import sys

from dory._runner import load, run


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run TARGET``."""
    parser = argparse.ArgumentParser(
        prog="python -m dory",
        description="Run a Dory processor as the instance the DORY_* environment describes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run", help="run one processor instance")
    start.add_argument("target", help="package.module:Class or path/to/file.py:Class")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        processor = load(args.target)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        print(f"python -m dory: {error}", file=sys.stderr)
        return 2
    return run(processor)


if __name__ == "__main__":
    sys.exit(main())
