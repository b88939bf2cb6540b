"""Optional dependencies: fail early with the line to run."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    pass


def require(module: str, pip_name: str | None = None, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise an error that says what to install.

    ``extra`` names the project extra that brings it (``pip install -e '.[curation]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        hint = f"pip install -e '.[{extra}]'" if extra else f"pip install {pip_name or module}"
        raise MissingDependency(
            f"this step needs the Python package '{pip_name or module}' ({exc}); install it with: {hint}"
        ) from exc
