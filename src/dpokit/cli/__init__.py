"""The ``dpokit`` command line: parse, call the library, print.

    dpokit train --config dpo.yaml       # DPO (any loss of the family); sft, eval alike
    dpokit demo                          # DPO against the exact optimum π*, end to end
    dpokit optimal --beta 0.5,1,2,5      # the lecture's worked example, a β sweep
    dpokit partition                     # V^T growth, exact log Z vs Monte Carlo
    dpokit figures --out out/figures     # the lecture's figures as PNGs

Commands live in :mod:`~dpokit.cli.training` (train, sft, eval, demo, bench) and
:mod:`~dpokit.cli.lecture` (optimal, partition, figures); their flags come from config
dataclasses (:mod:`~dpokit.cli.options`). User errors (:class:`~dpokit.errors.DpokitError`, bad
flags, and any OS error or allocation failure no command turned into one) print one line on
stderr and exit with status 2; other exceptions are bugs and stay tracebacks. Ctrl-C or SIGTERM
outside the training loop (which checkpoints on them) unwinds and exits with 130 or 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import click

from dpokit.cli.app import app  # lazy: a command's module is imported when it runs
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


def _say(line: str, *, stream_name: str = "stderr") -> None:
    """Print one line on ``sys.stderr`` (or stdout); a closed or failing stream is ignored, so
    reporting an error never raises one of its own."""
    stream = getattr(sys, stream_name, None)
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):  # closed, full, broken pipe
        print(line, file=stream, flush=True)


def _os_error_line(error: OSError) -> str:
    """``PATH: cause`` of an OS error (the path when it has one)."""
    cause = error.strerror or str(error) or type(error).__name__
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{' → '.join(names)}: {cause}" if names else cause


class _Terminated(BaseException):
    """SIGTERM outside the training loop's own handling (setup, the final save): it unwinds
    like Ctrl-C — ``finally`` blocks run, the run directory's lock is released, half-written
    temporaries are removed — where the default action would kill the process on the spot."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    """While inside, SIGTERM raises :class:`_Terminated` (the loop's own handler takes over
    during the steps and gives it back after). Only in a process of its own whose SIGTERM has
    its default action: not when embedded with a handler of its own, nor under torchrun, whose
    workers a SIGTERM must stop at once even inside a collective."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL or "LOCAL_RANK" in os.environ:
        yield
        return
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dpokit`` script and ``python -m dpokit``."""
    _configure_logging()
    try:
        with _sigterm_unwinds():
            app.main(args=argv, prog_name="dpokit", standalone_mode=False)
    except _Terminated:
        _say("dpokit: terminated (SIGTERM)")
        sys.exit(128 + signal.SIGTERM)
    except DpokitError as error:
        _say(f"dpokit: error: {error}")
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as error:
        _say(error.format_message(), stream_name="stdout")
        sys.exit(0)
    except click.UsageError as error:
        # the whole path (``dpokit config convert``): a subcommand's name alone is no command
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        _say(f"dpokit: error: {error.format_message()}{hint}")
        sys.exit(2)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.Abort:
        _say("dpokit: aborted")
        sys.exit(130)
    except OSError as error:  # the last safety net: a file the user named, not a bug
        _say(f"dpokit: error: {_os_error_line(error)}")
        sys.exit(2)
    except Exception as error:  # running out of memory is not a bug either
        if "torch" not in sys.modules:  # (no torch, no allocator to run out of)
            raise
        from dpokit.memory import error_line, is_out_of_memory

        if not is_out_of_memory(error):
            raise
        _say(f"dpokit: error: out of memory ({error_line(error)}); lower the batch size "
             f"(batch_size, per_device_eval_batch_size) or max_length")
        sys.exit(2)
