"""``python -m fmapicon`` (and ``torchrun -m fmapicon train ...``)."""

import sys

from fmapicon.cli import main

sys.exit(main())
