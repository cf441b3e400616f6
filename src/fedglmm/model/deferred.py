"""Third-party modules that fedglmm's imports would load without needing them, loaded on first use instead.

formulaic imports ``scipy.sparse.linalg`` when it is imported, for one path of its contrasts (sparse
output) that fedglmm never takes; that module loads ``scipy.linalg`` with it, about 0.03-0.05 s of the
start-up of a small fit (``fedglmm demo``, which needs neither).  :func:`defer` puts a stand-in for such a
module in ``sys.modules``: the import statement then binds the stand-in (an import reads only its
``__spec__``), and the first other attribute anyone reads of it -- ``scipy.sparse.linalg.inv``, ``from
scipy.sparse.linalg import splu``, the ``__path__`` an import of one of its submodules reads -- imports
the real module, which then replaces the stand-in where the import system keeps it (``sys.modules``, its
package's attribute); a reference to the stand-in kept before that reads through to the real module.
Importing this module defers ``scipy.sparse.linalg`` (nothing happens if it is loaded already):
:mod:`fedglmm.model.formula` and :mod:`fedglmm.model.design` import it before formulaic.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_LOCK = threading.RLock()


class _Deferred(types.ModuleType):
    """A module's stand-in until an attribute it does not have is read."""

    def __getattr__(self, attr):           # only for what the stand-in lacks: all but its name and spec
        return getattr(_load(self.__name__), attr)


def _load(name: str) -> types.ModuleType:
    with _LOCK:
        module = sys.modules.get(name)
        if isinstance(module, _Deferred):
            del sys.modules[name]
            module = importlib.import_module(name)          # sets the package's attribute too
        return module


def defer(name: str) -> None:
    """Put a stand-in for submodule ``name`` in ``sys.modules`` (its package is imported now)."""
    with _LOCK:
        if name in sys.modules:
            return
        parent, _, child = name.rpartition(".")
        try:
            package = importlib.import_module(parent)
            spec = importlib.util.find_spec(name)
        except ImportError:
            return
        if spec is None:
            return
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
        setattr(package, child, stand_in)


defer("scipy.sparse.linalg")
