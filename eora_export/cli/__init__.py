"""The ``eora-export`` command line.

- :mod:`.main`: ``main`` (dispatch to a subcommand or the main command, one-line errors, exit codes, signals);
- :mod:`.run`: the main command (options generated from :mod:`eora_export.config`, the run itself);
- :mod:`.commands`: ``compare``, ``inspect``, ``build-plugin``, ``export``;
- :mod:`.finetune`: ``finetune``;
- :mod:`.parser`: what they share (the parser class, option generation, the output kind).
"""

import signal
import threading

# Importing the command line takes seconds (torch). A Ctrl-C in that time reaches Python's default
# handler, and a library that swallows the KeyboardInterrupt inside an import leaves a half-imported
# module behind that fails later as something else ("Could not import module 'LlamaConfig'"). This
# handler behaves like the default one but remembers the signal, so ``main`` still reports an interrupt.
EARLY_SIGNALS: list[int] = []


def _early_interrupt(signum, frame) -> None:
    EARLY_SIGNALS.append(signum)
    raise KeyboardInterrupt


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _early_interrupt)

from .main import main  # noqa: E402
from .run import build_parser  # noqa: E402

__all__ = ["build_parser", "main"]
