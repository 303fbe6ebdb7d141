"""The ``mask2former`` command line: one sub-command per module of this package.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``. Modules are
imported only when their command runs, so ``mask2former --help`` is fast and an optional dependency is needed only
by the command that uses it.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# command name -> module under mask2former.commands
COMMANDS: dict[str, str] = {
    "segment": "segment",
    "segment-video": "segment_video",
    "evaluate": "evaluate",
    "export-onnx": "export_onnx",
    "convert-detectron2": "convert_detectron2",
    "convert-segmenter": "convert_segmenter",
    "demo": "demo",
}


def _load(command: str):
    return import_module(f"mask2former.commands.{COMMANDS[command]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the chosen command's module is imported (``argv`` says which)."""
    parser = argparse.ArgumentParser(
        prog="mask2former", description="Mask2Former: segment, evaluate, export, convert, demo."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((arg for arg in (argv or []) if not arg.startswith("-")), None)
    for name in COMMANDS:
        if wanted == name:
            module = _load(name)
            sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(sub)
        else:
            subparsers.add_parser(name, help=f"see `mask2former {name} --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``mask2former COMMAND ...``; returns the command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(_load(args.command).main(args) or 0)
