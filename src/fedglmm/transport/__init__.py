"""Transports carry encoded requests to sites and their replies back; they count rounds and bytes."""
from .inprocess import InProcessTransport, Transport

__all__ = ["InProcessTransport", "Transport"]
