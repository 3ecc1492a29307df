"""Old import path of :mod:`multiverse.format.layout` (kept for one release)."""

import sys

from multiverse.format import layout as _layout

sys.modules[__name__] = _layout
