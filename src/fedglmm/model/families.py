"""The families a model can name, their links and aliases: ``get_family(name, link)``.

The interface and the classic families are in :mod:`fedglmm.model.family`; the negative binomial and Gamma,
with a dispersion parameter, in :mod:`fedglmm.model.dispersion`.
"""
from __future__ import annotations

from ..errors import InputError
from .dispersion import GammaFamily, NegativeBinomial
from .family import DispersionDerivs, Family

__all__ = ["Family", "DispersionDerivs", "get_family", "FAMILIES"]

# name -> (class, links, default link)
FAMILIES = {
    "gaussian": (Family, ("identity",), "identity"),
    "binomial": (Family, ("logit", "probit", "cloglog"), "logit"),
    "poisson": (Family, ("log",), "log"),
    "negative_binomial": (NegativeBinomial, ("log",), "log"),
    "gamma": (GammaFamily, ("inverse", "log", "identity"), "inverse"),
}
ALIASES = {"nbinom2": "negative_binomial", "negbin": "negative_binomial", "nb": "negative_binomial"}


def get_family(name, link: str | None = None) -> Family:
    """Look up a family by name (``gaussian``, ``binomial``, ``poisson``, ``negative_binomial`` (alias
    ``nbinom2``), ``gamma`` (alias ``Gamma``)) and optional link."""
    if isinstance(name, Family):
        return name
    fam = str(name).strip().lower()
    fam = ALIASES.get(fam, fam)
    if fam not in FAMILIES:
        raise InputError(f"unknown family '{name}': use one of {', '.join(FAMILIES)}")
    cls, links, default = FAMILIES[fam]
    lk = default if link is None else str(link).strip().lower()
    if lk not in links:
        raise InputError(f"link '{link}' is not available for family {fam}: use one of {', '.join(links)}")
    return cls(fam, lk)
