"""``main``: dispatch to a subcommand or the main command, and turn every failure into one line.

Every failure a user can cause prints one line and exits with the code of its class
(errors.py); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from ..errors import INTERNAL_ERROR_EXIT_CODE, EoraError, Interrupted, UsageError
from . import commands, finetune
from .run import build_parser, run

SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "compare": commands.compare_main,
    "inspect": commands.inspect_main,
    "build-plugin": commands.build_plugin_main,
    "finetune": finetune.finetune_main,
    "export": commands.export_main,
}


_signalled = False  # Ctrl-C or SIGTERM arrived during this run

# How long a torchrun rank other than 0 outlives a usage error that rank 0 reports: torchrun stops
# every rank once one exits, so a silent rank leaving first could stop rank 0 before its line.
# Rank 0 meets the same error within milliseconds; its exit ends the wait (torchrun's SIGTERM).
FOLLOWER_GRACE_S = 5.0


def _on_signal(signum, frame) -> None:
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="eora-export: %(message)s")
    global _signalled
    _signalled = False
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from . import EARLY_SIGNALS

        if EARLY_SIGNALS:  # Ctrl-C while the command line was being imported: nothing started yet
            EARLY_SIGNALS.clear()
            return _report_interrupt()
        return _main(argv, debug)
    finally:
        from . import _early_interrupt

        for sig, handler in previous.items():
            # The import-time handler has done its job: afterwards Ctrl-C is Python's again.
            signal.signal(sig, signal.default_int_handler if handler is _early_interrupt else handler)


def _main(argv: list[str], debug: bool) -> int:
    if "--quiet" in argv:
        os.environ["TQDM_DISABLE"] = "1"  # before anything imports tqdm, which reads it once
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        if args.quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return run(args)
    except EoraError as e:
        if _signalled:
            # The interrupt landed inside code whose failure we report in our own words (transformers'
            # lazy import turns it into "Could not import module", preflight into "does not load"):
            # it is still an interrupt, not bad input.
            return _interrupted(debug)
        if debug:
            raise
        if isinstance(e, UsageError) and _follower_rank():
            with contextlib.suppress(KeyboardInterrupt):  # torchrun's SIGTERM, once rank 0 has left
                time.sleep(FOLLOWER_GRACE_S)
            return e.exit_code  # rank 0 prints it
        print(f"eora-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `eora-export inspect X | head`: the reader left; nothing to report.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return _interrupted(debug)
    except MemoryError:
        print("eora-export: error: out of memory; use --fast, fewer --calib-samples, or a bigger machine", file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE
    except OSError as e:
        if _signalled:
            return _interrupted(debug)
        if debug:
            raise
        print(f"eora-export: error: {e.strerror or e} ({e.filename or 'I/O'}); check the path, permissions and free disk space", file=sys.stderr)
        return 4
    except Exception as e:
        if _signalled:
            # The interrupt landed inside code that turns it into another error (a C extension's
            # module init reports "ImportError: initialization failed"): it is still an interrupt.
            return _interrupted(debug)
        if debug:
            raise
        print(f"eora-export: internal error: {type(e).__name__}: {e} (rerun with --debug and report it)", file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE


def _follower_rank() -> bool:
    """A torchrun rank other than 0. A usage error comes from the command line every rank shares, so
    every rank finds the same one: rank 0 alone reports it instead of one copy per process. Other
    errors may differ between ranks (a file missing on one node) and each rank reports its own."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def _interrupted(debug: bool) -> int:
    if debug:
        raise
    return _report_interrupt()


def _report_interrupt() -> int:
    print("eora-export: interrupted; no partial output was written", file=sys.stderr)
    return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
