"""``python -m multiverse.cli``: the same as the ``multiverse`` command."""

import sys

from multiverse.cli import main

sys.exit(main())
