"""``python -m eora_export.cli ...`` (as before the package split) is ``eora-export ...``."""

import sys

from . import main

sys.exit(main())
