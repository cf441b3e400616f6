"""What a model is, shared by sites and the coordinator: formula, notation and design, families, options.

No I/O and nothing about who computes what; see :mod:`fedglmm.model.spec` for the notation.
"""
