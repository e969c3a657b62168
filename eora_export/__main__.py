"""``python -m eora_export ...`` is ``eora-export ...``."""

import sys

from .cli import main

sys.exit(main())
