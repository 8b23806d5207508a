"""Modules of the ``cli`` extra (``pip install 'fused_optim[cli]'``): tqdm and matplotlib.

The optimizers need neither; the ``fused-optim`` command's progress bars and plots do. Without
them, the command says in one line what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = "pip install 'fused_optim[cli]'"


class MissingExtraError(ImportError):
    """A module of the ``cli`` extra is not installed; the message names the install command."""


def import_extra(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for a module of the ``cli`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        package = name.split(".")[0]
        raise MissingExtraError(
            f"this needs {package}, which is not installed: {INSTALL}"
        ) from error
