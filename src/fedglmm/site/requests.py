"""The fields of a request a site checks before it computes anything costly: whatever arrives, the work
a request can cause is bounded (a quadrature grid of a billion nodes, a moment order of a hundred would
otherwise hang the site).  A bad field is a one-line refusal naming it."""
from __future__ import annotations

from ..errors import FedGLMMError

MAX_NAGQ = 50              # nodes per random-effect dimension (lme4 allows 25)
MAX_NODES = 10_000         # nodes of the product grid per group (nagq ** q)
CURVATURES = ("observed", "expected")
ORDERS = (2, 3, 4)


def _bad(site_id: str, what: str):
    raise FedGLMMError(f"site '{site_id}': refused a malformed request ({what})")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _quadrature(site_id: str, nagq, curvature, q: int | None = None) -> tuple[int, str]:
    if not _whole(nagq) or not 1 <= nagq <= MAX_NAGQ:
        _bad(site_id, f"nagq must be a whole number from 1 to {MAX_NAGQ}, not {nagq!r}")
    if q is not None and nagq ** q > MAX_NODES:
        _bad(site_id, f"nagq {nagq} with {q} random effects per group is {nagq ** q} quadrature nodes, more than "
                      f"{MAX_NODES}")
    if curvature not in CURVATURES:
        _bad(site_id, f"curvature must be 'observed' or 'expected', not {curvature!r}")
    return nagq, curvature


def check_setup(site_id: str, req: dict, design) -> tuple[int, str]:
    """The quadrature of a set-up request, bounded for this design: ``(nagq, curvature)``."""
    return _quadrature(site_id, req.get("nagq", 1), req.get("curvature", "observed"), design.Z.shape[1])


def check_oneshot(site_id: str, req: dict) -> None:
    order = req.get("order")
    if order is not None and order not in ORDERS:
        _bad(site_id, f"the moment order must be 2, 3 or 4, not {order!r}")
    local = req.get("local")
    if local is not None:
        if not isinstance(local, dict):
            _bad(site_id, "'local' must be a dictionary")
        _quadrature(site_id, local.get("nagq", 1), local.get("curvature", "observed"))
        if not isinstance(local.get("reml", True), bool) or not isinstance(local.get("exact", False), bool):
            _bad(site_id, "'local.reml' and 'local.exact' must be true or false")
        sites = local.get("sites", 1)
        if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= 1_000_000:
            _bad(site_id, f"'local.sites' must be a number of sites, not {sites!r}")
