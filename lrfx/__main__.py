"""python -m lrfx: the lrfx command line."""

import sys

from lrfx.cli import main

sys.exit(main())
