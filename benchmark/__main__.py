"""``python -m vlpbench``: the same command line as the ``vlpbench`` script."""

import sys

from vlpbench.cli import main

sys.exit(main())
