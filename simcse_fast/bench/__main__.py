"""``python -m simcse_fast.bench [options]``: the same as ``simcse-fast bench [options]``."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
