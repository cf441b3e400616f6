"""Provisional: the pseudo-data generator (being split by concern)."""
from ...pseudodata import PseudoDataWarning, generate_group, generate_order2  # noqa: F401
