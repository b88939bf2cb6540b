"""One logger per package, with a clear prefix."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a package or module (e.g. ``curation.filter``).

    Messages read ``[curation.filter] message``; the level comes from
    ``PARADIFFUSION_LOG_LEVEL`` (default INFO).
    """
    global _CONFIGURED
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root = logging.getLogger("pd")
        root.addHandler(handler)
        root.setLevel(os.environ.get("PARADIFFUSION_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(f"pd.{name}")
