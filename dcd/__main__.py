"""``python -m dcd``: the same command line as ``dcd``."""
import sys

from .cli import main

sys.exit(main())
