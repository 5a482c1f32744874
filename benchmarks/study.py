"""``python benchmarks/study.py [...]``: the study's entry point; the code is the package benchmarks/study/."""

import sys

from study.cli import main  # benchmarks/ is sys.path[0] here, and the package comes before this file

if __name__ == "__main__":
    sys.exit(main())
