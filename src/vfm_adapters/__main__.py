"""``python -m vfm_adapters``: the same as the ``vfm-adapters`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
