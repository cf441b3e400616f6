"""The limits on what a coordinator may ask a site (``[limits]`` in ``site.toml``), checked before a
request is answered.  Published attacks on federated GLMs reconstruct rows from chosen queries (many
points, extreme parameters, a transform that isolates a column) or difference two fits whose rows differ
by a few (through missing-value patterns or column choices); these rules take that freedom away.

* **same session** (fixed): ``evaluate`` and ``finalize`` are answered only within a fit set up (a
  ``setup`` request, or the one-shot round of the same fit) in the same coordinator session -- the Flower
  run, or the in-process transport -- and never before one;
* ``max_points``: points in one ``evaluate`` request;
* ``max_requests``: requests in one fit, from its set-up on (describe comes before and is not counted);
* ``max_fits_per_day``: fits set up per UTC day (remembered in the site's state file);
* ``min_rows`` (differencing): a fit whose rows differ from an earlier fit's by fewer than ``min_rows``
  rows (and by at least one) is refused; identical row sets are fine.  Rows are compared by keyed hashes
  (:mod:`fedglmm.site.state`);
* **transform** (fixed): the transform and scaling of a fit are fixed by its first ``evaluate`` /
  ``finalize`` and have the documented form: ``transform`` A is square, finite, with a positive diagonal
  and, off the diagonal, entries only in the intercept's row (A centres and scales the columns);
  ``zscale`` is finite and positive, one entry per random-effect column;
* ``max_scaled``: on this site's rows, every entry of the scaled columns X·A and Z / zscale is at most
  this in absolute value.  A pooled centring and scaling over N rows keeps every entry below √N
  (Samuelson's inequality), so the default 1e5 admits any such transform for up to 1e10 rows;
* ``max_param``: every coordinate of a requested point (and β, σ at ``finalize``) is finite and at most
  this in absolute value on the internal scale (standardised columns);
* ``require_secure_aggregation``: sums leave this site only masked (``setup``, ``evaluate``,
  ``finalize`` without secure aggregation, and one-shot requests without its key exchange, are refused).

Each refusal is one line naming its rule, and goes to the audit log like any reply.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import SiteRefusal
from .state import SiteState


@dataclass
class _Fit:
    session: object
    set_up: bool                       # a setup (not only a one-shot round) has built the design
    requests: int = 0
    scale: tuple | None = None         # (transform, zscale) fixed by the first use
    extra: dict = field(default_factory=dict)


class Limits:
    """One site's request limits and their memory (see the module docstring)."""

    def __init__(self, site_id: str, config):
        self.site_id, self.config = site_id, config
        self.on = config.limited
        self.state = SiteState(config.state_path) if self.on else None
        self.fit: _Fit | None = None

    def refuse(self, what: str, rule: str):
        where = self.config.where(rule) if rule in _CONFIG_RULES else f"rule: {rule}"
        raise SiteRefusal(f"site '{self.site_id}' refuses: {what} ({where})")

    # --- a fit begins -------------------------------------------------------------------------------
    def open_fit(self, session, frame, by: str) -> None:
        """A ``setup`` or ``oneshot`` request on ``frame`` (the rows the model uses) starts a fit, or a
        setup continues the one-shot round of the same session's fit."""
        if self.fit is not None and self.fit.session == session and by == "setup" and not self.fit.set_up:
            self.fit.set_up = True
            self.count()
            return
        self.fit = None
        if not self.on:
            self.fit = _Fit(session, by == "setup")
            return
        cfg, state = self.config, self.state
        if state.fits_today() >= cfg.max_fits_per_day:
            self.refuse(f"{state.fits_today()} fits were set up today, the maximum is {cfg.max_fits_per_day:g}",
                        "max_fits_per_day")
        rows = state.row_hashes(frame)
        if cfg.min_rows:
            diff = state.nearest(rows)
            if diff is not None and diff < cfg.min_rows:
                self.refuse(f"the rows of this fit differ from an earlier fit's by {diff} row"
                            f"{'s' if diff != 1 else ''}, fewer than {cfg.min_rows}: the difference of the two "
                            "fits would describe those rows", "min_rows")
        state.record_fit()
        state.remember(rows)
        state.save()
        self.fit = _Fit(session, by == "setup")
        self.count()

    def ride(self, session, frame) -> None:
        """A set-up riding on a request names the design already built: within this session's fit nothing
        changes (a one-shot round's fit is now set up); from another session it starts a fit on it."""
        fit = self.fit
        if fit is not None and fit.session == session:
            if not fit.set_up:
                fit.set_up = True
                self.count()
            return
        self.open_fit(session, frame, "setup")

    def count(self) -> None:
        """One more request in the current fit."""
        self.fit.requests += 1
        if self.on and self.fit.requests > self.config.max_requests:
            self.refuse(f"this fit has had {self.fit.requests - 1} requests, the maximum is "
                        f"{self.config.max_requests:g}", "max_requests")

    # --- requests within a fit ----------------------------------------------------------------------
    def check_use(self, kind: str, session, req: dict, design) -> None:
        """An ``evaluate`` / ``finalize`` request: in this session's fit, within its bounds."""
        fit = self.fit
        if fit is None or not fit.set_up or fit.session != session or design is None:
            what = "no fit was set up in this coordinator session" if fit is None or fit.session != session \
                else "this fit was not set up (a setup request comes first)"
            self.refuse(f"{kind} before its set-up: {what}", "same session")
        self.count()
        if not self.on:
            return
        cfg = self.config
        points = np.asarray(req["points"] if "points" in req else [req["point"]] if "point" in req
                            else np.zeros((0, 0)), dtype=float)
        if points.ndim != 2:
            self.refuse(f"{kind} points must form a table (one row per point)", "max_points")
        if len(points) > cfg.max_points:
            self.refuse(f"{len(points)} points in one request, the maximum is {cfg.max_points:g}", "max_points")
        extra = [np.ravel(np.asarray(req[k], float)) for k in ("beta_internal", "sigma") if req.get(k) is not None]
        values = np.concatenate([points.ravel()] + extra)
        if not np.all(np.isfinite(values)) or np.any(np.abs(values) > cfg.max_param):
            bad = float(values[~np.isfinite(values) | (np.abs(values) > cfg.max_param)][0])
            self.refuse(f"a requested parameter is {bad:g}, outside ±{cfg.max_param:g}", "max_param")
        self._check_scale(req, design)

    def _check_scale(self, req: dict, design) -> None:
        A = np.asarray(req["transform"], dtype=float)
        zs = np.asarray(req.get("zscale", np.ones(0)), dtype=float)
        if self.fit.scale is not None:
            if not (A.shape == self.fit.scale[0].shape and np.array_equal(A, self.fit.scale[0])
                    and zs.shape == self.fit.scale[1].shape and np.array_equal(zs, self.fit.scale[1])):
                self.refuse("the transform or scaling differs from the one fixed at the fit's set-up", "transform")
            return
        p, q = design.X.shape[1], design.Z.shape[1]
        why = _form(A, zs, p, q, list(design.x_names))
        if why:
            self.refuse(f"the transform is not of the documented form: {why}", "transform")
        big = max(float(np.max(np.abs(design.X @ A), initial=0.0)),
                  float(np.max(np.abs(design.Z / (zs if q else 1.0)), initial=0.0)) if q else 0.0)
        if not big <= self.config.max_scaled:
            self.refuse(f"the transform scales a column of this site's data to {big:.3g}, more than "
                        f"{self.config.max_scaled:g}", "max_scaled")
        self.fit.scale = (A.copy(), zs.copy())


def _form(A: np.ndarray, zs: np.ndarray, p: int, q: int, names: list) -> str | None:
    """Why (A, zscale) is not a centring-and-scaling transform, or None."""
    if A.shape != (p, p):
        return f"transform of shape {A.shape} for {p} fixed-effect columns"
    if not np.all(np.isfinite(A)):
        return "a transform entry is not finite"
    if not np.all(np.diag(A) > 0):
        return "a diagonal entry is not positive"
    off = A - np.diag(np.diag(A))
    if "Intercept" in names:
        off[names.index("Intercept"), :] = 0.0
    if np.any(off != 0):
        return "an off-diagonal entry outside the intercept's row"
    if zs.shape != (q,) and not (q and zs.shape == (0,)):
        return f"zscale of shape {zs.shape} for {q} random-effect columns"
    if zs.size and not (np.all(np.isfinite(zs)) and np.all(zs > 0)):
        return "a zscale entry is not finite and positive"
    return None


_CONFIG_RULES = {"max_points", "max_requests", "max_fits_per_day", "max_param", "max_scaled", "min_rows",
                 "require_secure_aggregation"}
