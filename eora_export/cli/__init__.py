"""The ``eora-export`` command line.

- :mod:`.main`: ``main`` (dispatch to a subcommand or the main command, one-line errors, exit codes, signals);
- :mod:`.run`: the main command (options generated from :mod:`eora_export.config`, the run itself);
- :mod:`.commands`: ``compare``, ``inspect``, ``build-plugin``, ``export``;
- :mod:`.finetune`: ``finetune``;
- :mod:`.parser`: what they share (the parser class, option generation, the output kind).
"""

from .main import main
from .run import build_parser

__all__ = ["build_parser", "main"]
