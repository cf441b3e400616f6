"""The numerical core both sides run: likelihood engines (Laplace / adaptive Gauss–Hermite for GLMMs,
exact sums for linear mixed models), quadrature, the set-up sums and the internal scale, starting
values, and the trust-region Newton iteration that maximises a sum of engines -- over the coordinator's
rounds, over the coordinator's pseudo-data, or over a site's own rows.

Imports only :mod:`fedglmm.model`.
"""
