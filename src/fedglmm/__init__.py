"""fedglmm: generalized linear mixed models fitted across sites that share sums, never rows.

The names below are imported on first use (PEP 562), so ``import fedglmm`` and the command line start
without loading numpy's neighbours (pandas, scipy, formulaic) until a fit needs them."""
from __future__ import annotations

from importlib import import_module

from .errors import FedGLMMError, InputError

__all__ = ["fit", "fit_on", "fit_summaries", "split_sites", "anova", "FitResult", "FedGLMMError", "InputError",
           "get_family", "SiteConfig"]
__version__ = "0.1.0"

_LAZY = {"anova": ".comparison", "fit": ".api", "fit_on": ".api", "fit_summaries": ".api", "split_sites": ".api",
         "FitResult": ".results", "get_family": ".model.families", "SiteConfig": ".site"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedglmm' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
