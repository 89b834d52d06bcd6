"""``dmmi`` command line: parses and dispatches only.

Each command group lives beside the code it drives and registers itself here through a
``register(subparsers)`` function that adds its parser(s) with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dmmi import __version__
from dmmi.errors import DmmiError

# modules that own a command group, in the order `dmmi --help` lists them
COMMAND_MODULES = (
    "dmmi.engine.commands",  # train, evaluate, predict, demo
    "dmmi.data.cli",  # data synth, data stats
    "dmmi.convert",  # convert
    "dmmi.export",  # export
    "dmmi.info",  # presets, config show
    "dmmi.serve",  # serve
)


EPILOG = """\
common commands:
  dmmi demo                                                 # the whole system on synthetic data (CPU, offline)
  dmmi predict photo.jpg "the dog on the left" --model runs/demo/model --out preds/
  dmmi serve --model runs/demo/model                        # a web page on http://127.0.0.1:7860
  dmmi data synth --out data/synth
  dmmi train --config dmmi_tiny --set data.root=data/synth --set train.output_dir=runs/tiny
  dmmi evaluate --model runs/tiny/model --split test
  dmmi presets                                              # the presets; dmmi config show PRESET: their fields
  dmmi convert refzom_swin_b.pth --out dmmi-refzom-swin-b/

`dmmi COMMAND --help` shows each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmmi",
        description="Referring image segmentation beyond one-to-one (DMMI, ICCV 2023).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dmmi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


class _StderrNotes(logging.Handler):
    """The ``dmmi`` logger's notes (e.g. the Predictor's domain note) as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"dmmi: {record.getMessage()}", file=sys.stderr)


def _console_notes() -> None:
    logger = logging.getLogger("dmmi")
    if not any(isinstance(h, _StderrNotes) for h in logger.handlers):
        logger.addHandler(_StderrNotes(logging.INFO))
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub unless the user asks
    _console_notes()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except DmmiError as e:
        print(f"dmmi: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmmi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dmmi config show demo_lite | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
