"""Old import path of :mod:`multiverse.format.grammar` (kept for one release)."""

import sys

from multiverse.format import grammar as _grammar

sys.modules[__name__] = _grammar
