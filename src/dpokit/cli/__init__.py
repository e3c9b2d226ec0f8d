"""The ``dpokit`` command line: parse, call the library, print.

    dpokit train --config dpo.yaml       # DPO (any loss of the family); sft, eval alike
    dpokit demo                          # DPO against the exact optimum π*, end to end
    dpokit optimal --beta 0.5,1,2,5      # the lecture's worked example, a β sweep
    dpokit partition                     # V^T growth, exact log Z vs Monte Carlo
    dpokit figures --out out/figures     # the lecture's figures as PNGs

Commands live in :mod:`~dpokit.cli.training` (train, sft, eval, demo, bench) and
:mod:`~dpokit.cli.lecture` (optimal, partition, figures); their flags come from config
dataclasses (:mod:`~dpokit.cli.options`). User errors (:class:`~dpokit.errors.DpokitError` and bad
flags) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys

import click

from dpokit.cli import lecture, training  # noqa: F401  (they register their commands)
from dpokit.cli.app import app
from dpokit.errors import DpokitError


def _configure_logging() -> None:
    """dpokit's warnings as ``dpokit: warning: …`` lines on stderr; quiet library progress. The
    handler writes to whatever ``sys.stderr`` is at the time of each message (not the stream of
    the first call), so a redirected or replaced stderr is honoured."""
    import logging
    import os

    class Handler(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("dpokit")
    if not any(getattr(h, "_dpokit", False) for h in logger.handlers):
        handler = Handler()
        handler.setFormatter(logging.Formatter("dpokit: %(levelname)s: %(message)s"))
        handler._dpokit = True
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dpokit`` script and ``python -m dpokit``."""
    _configure_logging()
    try:
        app.main(args=argv, prog_name="dpokit", standalone_mode=False)
    except DpokitError as error:
        print(f"dpokit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as error:
        print(error.format_message())
        sys.exit(0)
    except click.UsageError as error:
        hint = f" (see 'dpokit {error.ctx.info_name} --help')" if error.ctx else ""
        if error.ctx and error.ctx.info_name == "dpokit":
            hint = " (see 'dpokit --help')"
        print(f"dpokit: error: {error.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.Abort:
        print("dpokit: aborted", file=sys.stderr)
        sys.exit(130)
