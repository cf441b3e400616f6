"""A site: it holds its private rows and answers the coordinator's requests with sums only.

A site never imports the optimiser and never sends a row.  Each request arrives as bytes
(:mod:`fedglmm.protocol`) and each reply leaves as bytes; a user error inside the site becomes a reply
``{"error": "<one line>"}`` so the coordinator can stop the fit with the site's own message.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from . import protocol
from .design import build_design, describe_frame
from .errors import FedGLMMError
from .families import get_family
from .formula import parse_formula
from .gaussian import LMMSums
from .likelihood import GLMMLikelihood
from .spec import Schema


class Site:
    """One institution's data behind the protocol."""

    def __init__(self, site_id: str, frame: pd.DataFrame, min_group: int = 10):
        self.site_id = str(site_id)
        self.frame = frame
        self.min_group = int(min_group)   # smallest group whose own summaries may leave (one-shot)
        self.design = None
        self.family = None
        self._engine = None
        self._transform = None
        self._described = None       # the formula the frame was last checked for

    # --- the boundary -------------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        """Answer one encoded request with one encoded reply."""
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
        return protocol.encode(reply)

    # --- handlers -----------------------------------------------------------------------------------
    def _on_describe(self, req):
        spec = parse_formula(req["formula"])
        out = {"site": self.site_id, **describe_frame(self.frame, spec, self.site_id)}
        self._described = req["formula"]
        return out

    def _build(self, req, spec, schema):
        return build_design(spec, schema, self.frame, self.family, self.site_id,
                            checked=self._described == req["formula"])

    def _on_oneshot(self, req):
        from .methods.oneshot import summarize

        return summarize(self.frame, req["formula"], req["family"], req.get("link"), self.site_id,
                         order=req.get("order"), min_group=self.min_group, local=req.get("local"))

    def _on_setup(self, req):
        spec = parse_formula(req["formula"])
        self.family = get_family(req["family"], req.get("link"))
        schema = Schema(kinds=dict(req["schema"]["kinds"]), levels={k: list(v) for k, v in req["schema"]["levels"].items()})
        self.design = d = self._build(req, spec, schema)
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
        reply.update({"levels": list(d.group_levels), "modes": modes, "condsd": sds})
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
