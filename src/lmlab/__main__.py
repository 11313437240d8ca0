"""``python -m lmlab``: the ``lmlab`` command without the installed script."""

import sys

from lmlab.cli import main

sys.exit(main())
