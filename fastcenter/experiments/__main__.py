"""`python -m fastcenter.experiments centering ...` (see fastcenter/experiments/cli.py)."""

import sys

from .cli import main

sys.exit(main())
