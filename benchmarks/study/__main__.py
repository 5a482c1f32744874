"""``python -m benchmarks.study`` from the repository root (or ``python -m study`` from benchmarks/)."""

import sys

from .cli import main

sys.exit(main())
