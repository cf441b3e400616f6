"""A site: it holds its private rows and answers the coordinator's requests with sums only.

A site never imports the optimiser and never sends a row.  Each request arrives as bytes
(:mod:`fedglmm.protocol`) and each reply leaves as bytes; a user error inside the site becomes a reply
``{"error": "<one line>"}`` so the coordinator can stop the fit with the site's own message.

A site applies its disclosure rules (:class:`fedglmm.siteconfig.SiteConfig`) before anything leaves:
it refuses a request whose answer would break one (too few rows, a small factor level or outcome class,
too many parameters per row, a column outside its allowed list), and it withholds the conditional modes
of groups smaller than its ``min_group``.  With an audit log (:mod:`fedglmm.audit`) it appends one line
per request: what was asked, what was sent (names, shapes, hashes) or why it refused.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import protocol
from .audit import AuditLog
from .design import _kind, _labels, _level_columns, build_design, describe_frame
from .errors import FedGLMMError, SiteRefusal
from .families import get_family
from .formula import parse_formula, variables
from .gaussian import LMMSums
from .likelihood import GLMMLikelihood
from .siteconfig import SiteConfig
from .spec import Schema


class Site:
    """One institution's data behind the protocol."""

    def __init__(self, site_id: str, frame: pd.DataFrame, min_group: int = 10, config: SiteConfig | None = None,
                 audit: AuditLog | str | None = None):
        """``config=None``: no rules but ``min_group`` for one-shot blocks (:meth:`SiteConfig.permissive`);
        with a config, its ``min_group`` governs.  ``audit``: an :class:`AuditLog` or its path (default:
        the config's ``audit_log``, if any)."""
        self.site_id = str(site_id)
        self.frame = frame
        self.config = SiteConfig.permissive(min_group) if config is None else config
        self.min_group = int(self.config.min_group)   # smallest group whose own outputs may leave
        if audit is None and self.config.audit_log:
            audit = self.config.audit_log
        self.audit = AuditLog(audit) if isinstance(audit, (str, Path)) else audit
        self.design = None
        self.family = None
        self._engine = None
        self._transform = None
        self._described = None       # the formula the frame was last checked for

    # --- the boundary -------------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        """Answer one encoded request with one encoded reply (and log both when auditing)."""
        reply, kind = self._answer(data)
        out = protocol.encode(reply)
        if self.audit is not None:
            try:
                self.audit.record(self.site_id, kind, data, out, reply)
            except (OSError, ValueError, TypeError) as exc:
                # nothing leaves that the log does not show
                reply = {"error": f"site '{self.site_id}': cannot write its audit log ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())})"}
                out = protocol.encode(reply)
        return out

    def _answer(self, data: bytes) -> tuple[dict, str | None]:
        kind = None
        try:
            req = protocol.decode(data)
            kind = req.get("kind")
            handler = getattr(self, f"_on_{kind}", None)
            if kind not in protocol.KINDS or handler is None:
                raise FedGLMMError(f"site '{self.site_id}': unknown request '{kind}'")
            reply = handler(req)
        except FedGLMMError as exc:
            reply = {"error": str(exc)}
        except protocol.ProtocolError as exc:
            reply = {"error": f"site '{self.site_id}': refused a malformed request ({exc})"}
        except Exception as exc:      # nothing but a one-line reply may leave the site, never a traceback
            reply = {"error": f"site '{self.site_id}': could not answer the request: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        return reply, kind if isinstance(kind, str) else None

    # --- disclosure rules ---------------------------------------------------------------------------
    def _refuse(self, what: str, key: str):
        raise SiteRefusal(f"site '{self.site_id}' refuses: {what} ({self.config.where(key)})")

    def _check_frame_rules(self, spec) -> None:
        """Rules checked before the frame is read: allowed columns and the row count."""
        cfg = self.config
        if cfg.allowed_columns is not None:
            bad = [c for c in variables(spec) if c not in cfg.allowed_columns]
            if bad:
                cols = ", ".join(f"'{c}'" for c in bad)
                self._refuse(f"column{'s' if len(bad) > 1 else ''} {cols} {'are' if len(bad) > 1 else 'is'} "
                             "not among its allowed columns", "allowed_columns")
        if cfg.min_rows and len(self.frame) < cfg.min_rows:
            self._refuse(f"{len(self.frame)} rows, fewer than the minimum of {cfg.min_rows}", "min_rows")

    def _check_cells(self, spec) -> None:
        """Every level present here of every factor the model uses has at least ``min_cell`` rows."""
        cfg = self.config
        if not cfg.min_cell:
            return
        kinds = {str(c): _kind(dt) for c, dt in self.frame.dtypes.items()}
        for col in _level_columns(spec, kinds):
            counts = pd.Series(_labels(self.frame[col])).value_counts(sort=False)
            small = counts[counts < cfg.min_cell]
            if len(small):
                level = sorted(small.index, key=str)[0]
                self._refuse(f"column '{col}' level '{level}' has {int(small[level])} rows, fewer than the "
                             f"minimum of {cfg.min_cell}", "min_cell")

    def _check_model_rules(self, spec, n: int, p: int, ntheta: int, family, successes=None, trials=None):
        """Rules on the model: parameters per row and the binomial outcome classes."""
        cfg = self.config
        k = p + ntheta
        if np.isfinite(cfg.max_params_per_row) and (n == 0 or k / n > cfg.max_params_per_row):
            ratio = "no rows" if n == 0 else f"{k / n:.3g} per row"
            self._refuse(f"{k} parameters ({p} fixed-effect column{'s' if p != 1 else ''}, {ntheta} covariance "
                         f"parameter{'s' if ntheta != 1 else ''}) for {n} rows "
                         f"is {ratio}, more than the maximum of {cfg.max_params_per_row:g}", "max_params_per_row")
        if cfg.min_cell and family.name == "binomial":
            for what, count in (("successes", successes), ("failures", trials - successes)):
                if count < cfg.min_cell:
                    self._refuse(f"outcome '{spec.response}' has {count:g} {what}, fewer than the minimum of "
                                 f"{cfg.min_cell}", "min_cell")

    def _group_sizes(self, d) -> np.ndarray:
        """Observations per group: rows, or trials for ``cbind`` binomial outcomes (as the one-shot rule)."""
        weight = d.trials if self.family is not None and self.family.name == "binomial" else np.ones(d.n)
        return np.add.reduceat(weight, d.starts)

    # --- handlers -----------------------------------------------------------------------------------
    def _on_describe(self, req):
        spec = parse_formula(req["formula"])
        self._check_frame_rules(spec)
        desc = describe_frame(self.frame, spec, self.site_id)
        self._check_cells(spec)
        if self.config.allowed_columns is not None:       # no other column's name leaves
            desc["columns"] = {c: k for c, k in desc["columns"].items() if c in self.config.allowed_columns}
        out = {"site": self.site_id, **desc}
        self._described = req["formula"]
        return out

    def _build(self, req, spec, schema):
        return build_design(spec, schema, self.frame, self.family, self.site_id,
                            checked=self._described == req["formula"])

    def _on_oneshot(self, req):
        from .methods.oneshot import summarize

        spec = parse_formula(req["formula"])
        self._check_frame_rules(spec)
        msg = summarize(self.frame, req["formula"], req["family"], req.get("link"), self.site_id,
                        order=req.get("order"), min_group=self.min_group)
        self._check_cells(spec)
        if self.config.allowed_columns is not None:
            desc = msg["description"]
            desc["columns"] = {c: k for c, k in desc["columns"].items() if c in self.config.allowed_columns}
        sums = msg["sums"]
        self._check_model_rules(spec, msg["n"], len(msg["x_names"]), int(np.sum(msg["theta_mask"])),
                                get_family(req["family"], req.get("link")), sums.get("st_sy"), sums.get("st_sv"))
        return msg

    def _on_setup(self, req):
        spec = parse_formula(req["formula"])
        self.design, self.family = None, None
        if self.frame is not None:
            self._check_frame_rules(spec)
        family = get_family(req["family"], req.get("link"))
        schema = Schema(kinds=dict(req["schema"]["kinds"]), levels={k: list(v) for k, v in req["schema"]["levels"].items()})
        self.family = family
        d = self._build(req, spec, schema)
        if self.frame is not None:
            self._check_cells(spec)
            self._check_model_rules(spec, d.n, d.X.shape[1], int(np.sum(d.theta_mask)), family,
                                    float(d.y.sum()), float(d.trials.sum()))
        self.design = d
        self.nagq = int(req.get("nagq", 1))
        self.curvature = str(req.get("curvature", "observed"))
        self._engine, self._transform = None, None
        X = d.X
        reply = {"n": d.n, "ngroups": len(d.group_levels) if d.Z.shape[1] else 0,
                 "x_names": list(d.x_names), "z_names": list(d.z_names), "theta_mask": np.asarray(d.theta_mask),
                 "colsum": X.sum(axis=0), "colsq": (X * X).sum(axis=0), "xtx": X.T @ X,
                 "ztz": d.Z.T @ d.Z}
        if self.family.name != "gaussian":
            reply.update(start_sums(d, self.family))
        return reply

    def _engine_for(self, req):
        """The likelihood engine on the coordinator's internal scale: X̃ = XA, Z̃ = Z / zscale."""
        key = (np.asarray(req["transform"], float), np.asarray(req.get("zscale", np.ones(0)), float))
        if self._engine is None or not all(np.array_equal(a, b) for a, b in zip(key, self._transform)):
            zs = key[1] if len(key[1]) else np.ones(self.design.Z.shape[1])
            d = replace(self.design, X=self.design.X @ key[0], Z=self.design.Z / zs)
            if self.family.name == "gaussian":
                self._engine = LMMSums(d)
            else:
                self._engine = GLMMLikelihood(d, self.family, self.nagq, curvature=self.curvature)
            self._transform = key
        return self._engine

    def _evaluate_one(self, eng, x) -> dict:
        if isinstance(eng, LMMSums):
            return eng.evaluate(x, order=2)
        ev = eng.evaluate(x, hess=True)
        return {"value": ev.value, "grad": ev.grad, "hess": ev.hess}

    def _ride_setup(self, req):
        """A set-up payload may ride on the first evaluate / finalize request (hybrid fits)."""
        if "setup" in req:
            self._on_setup(req["setup"])

    def _on_evaluate(self, req):
        self._ride_setup(req)
        eng = self._engine_for(req)
        return {"points": [self._evaluate_one(eng, x) for x in np.asarray(req["points"], float)]}

    def _on_finalize(self, req):
        self._ride_setup(req)
        eng = self._engine_for(req)
        reply = self._evaluate_one(eng, np.asarray(req["point"], float))
        d = self.design
        if d.Z.shape[1] == 0:
            return reply
        if isinstance(eng, LMMSums):
            modes, sds = eng.conditional_modes(req["point"], np.asarray(req["beta_internal"]), float(req["sigma"]))
        else:
            modes, sds = eng.conditional_modes(req["point"])
        if not self.config.withhold_modes:
            reply.update({"levels": list(d.group_levels), "modes": modes, "condsd": sds})
            return reply
        keep = self._group_sizes(d) >= self.min_group
        levels = np.asarray(d.group_levels, dtype=object)
        # a withheld group's label was already sent in `describe`; nothing computed for it is sent
        reply.update({"levels": levels[keep].tolist(), "modes": np.asarray(modes)[keep],
                      "condsd": np.asarray(sds)[keep], "withheld": levels[~keep].tolist()})
        return reply

def start_sums(d, family) -> dict:
    """Sums for starting values, summed over the site's rows and groups (nothing per row or group).

    Binomial: one IRLS step from the intercept-only model η = c.  With a constant start, μ_j = m_j μ(c),
    the IRLS weight is m_j μ'(c)²/V(μ(c)) and w_j z_j is a fixed combination of y_j and m_j, so the step
    needs only XᵀMX, Xᵀm and Xᵀy, whatever c the coordinator picks (c = link(Σy / Σm)); for the first
    estimate of Σ the same holds per group, through the moments of A_g = Σ ζ_j y_j, B_g = Σ ζ_j m_j,
    T_g = Σ m_j ζ_j x_jᵀ and W_g = Σ m_j ζ_j ζ_jᵀ (see :func:`fedglmm.methods.iterative.null_step_start`).

    Poisson: one IRLS step from μ = y + ½ (near each count, so log y is linearised where it is accurate
    even for large random-effect variances), with the moments of the working residuals per group (see
    :func:`fedglmm.methods.iterative.moment_start`).
    """
    y, X, Zm = d.y, d.X, d.Z
    st = d.starts
    if family.name == "binomial":
        v = d.trials
        out = {"st_xvx": (X * v[:, None]).T @ X, "st_xv": X.T @ v, "st_xy": X.T @ y,
               "st_sy": float(y.sum()), "st_sv": float(v.sum())}
        if Zm.shape[1]:
            A_g = np.add.reduceat(Zm * y[:, None], st, axis=0)                                  # (G, q)
            B_g = np.add.reduceat(Zm * v[:, None], st, axis=0)
            T_g = np.add.reduceat((Zm * v[:, None])[:, :, None] * X[:, None, :], st, axis=0)  # (G, q, p)
            W_g = np.add.reduceat((Zm * v[:, None])[:, :, None] * Zm[:, None, :], st, axis=0)  # (G, q, q)
            out.update({"st_aa": A_g.T @ A_g, "st_ab": A_g.T @ B_g, "st_bb": B_g.T @ B_g,
                        "st_at": np.einsum("ga,gbk->abk", A_g, T_g), "st_bt": np.einsum("ga,gbk->abk", B_g, T_g),
                        "st_tt": np.einsum("gak,gbl->akbl", T_g, T_g),
                        "st_ww": np.einsum("gab,gcd->abcd", W_g, W_g), "st_w": W_g.sum(axis=0)})
        return out
    eta = family.linkfun(y + 0.5)
    d1, _, w, _ = family.derivs(y, d.trials, eta)
    z = eta + d1 / w - d.offset            # IRLS working response
    out = {"xtwx": (X * w[:, None]).T @ X, "xtwz": X.T @ (w * z)}
    if Zm.shape[1]:
        s_g = np.add.reduceat(Zm * (w * z)[:, None], st, axis=0)                        # (G, q)
        T_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * X[:, None, :], st, axis=0)  # (G, q, p)
        W_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * Zm[:, None, :], st, axis=0)  # (G, q, q)
        out.update({"mom_ss": s_g.T @ s_g, "mom_st": np.einsum("ga,gbk->abk", s_g, T_g),
                    "mom_tt": np.einsum("gak,gbl->akbl", T_g, T_g),
                    "mom_ww": np.einsum("gab,gcd->abcd", W_g, W_g), "mom_w": W_g.sum(axis=0)})
    return out
