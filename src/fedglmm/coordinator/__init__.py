"""The coordinator's side: schema agreement, the rounds it broadcasts and the Newton iteration over
them, the one-shot messages and the stand-ins fitted from them (pseudo-data), the hybrid's starts and
surrogate steps, and the assembly of the result.  It sees sums, never a row.

Imports only :mod:`fedglmm.model`, :mod:`fedglmm.likelihood` and :mod:`fedglmm.protocol`.
"""
