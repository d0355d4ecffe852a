"""``python -m lossscale``: the same as the ``lossscale`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
