"""The site's side: it holds its rows and answers the coordinator with sums under its own rules.

:class:`Site` (dispatch), :mod:`~fedglmm.site.rules` (``site.toml``: :class:`SiteConfig` and the checks),
:mod:`~fedglmm.site.audit` (the append-only log), :mod:`~fedglmm.site.summaries` (the one-shot message)
and :mod:`~fedglmm.site.own_fit` (the site's own fit for the hybrid's start).  Imports only
:mod:`fedglmm.model`, :mod:`fedglmm.likelihood` and :mod:`fedglmm.protocol`.
"""
from .rules import SiteConfig
from .site import Site

__all__ = ["Site", "SiteConfig"]
