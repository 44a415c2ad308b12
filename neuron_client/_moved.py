"""Old import paths that users may have, kept for one release (0.1.x) as the moved modules themselves."""
from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make ``old`` the module ``new`` (one module object: patching either patches both), with a warning."""
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
