"""Deployment across machines on Flower: the coordinator's SuperLink, the sites' SuperNodes, certificates.

Everything here imports Flower lazily (``pip install 'fedglmm[flower]'``); the rest of fedglmm never
does.  See :mod:`fedglmm.transport.flower` for the design.
"""
