"""A site: it holds its private rows and answers the coordinator's requests with sums only.

The site dispatches each request to the model (:mod:`fedglmm.model`), its engine
(:mod:`fedglmm.likelihood`), its one-shot summaries (:mod:`fedglmm.site.summaries`) and its rules
(:mod:`fedglmm.site.rules`); it never runs coordinator code and never sends a row.  Each request arrives
as bytes (:mod:`fedglmm.protocol`) and each reply leaves as bytes; a user error inside the site becomes a
reply ``{"error": "<one line>"}`` so the coordinator can stop the fit with the site's own message.

The rules are checked before anything leaves: a request whose answer would break one is refused (too
few rows, a small factor level or outcome class, too many parameters per row, a column outside the
allowed list), and the conditional modes of groups smaller than ``min_group`` are withheld.  With an
audit log (:mod:`fedglmm.site.audit`) the site appends one line per request: what was asked, what was
sent (names, shapes, hashes) or why it refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import protocol
from ..errors import FedGLMMError
from ..likelihood.blas import single_blas
from ..likelihood import fused
from ..likelihood.conditional import mode_derivatives
from ..likelihood.engine import EngineCache, make_engine
from ..likelihood.laplace import GLMMLikelihood
from ..likelihood.glmm_shared import SharedGLMMSums
from ..likelihood.lmm_shared import to_global
from ..likelihood.setup import setup_reply
from ..model.design import build_design, coding_key, describe_frame, transform_statistics
from ..model.families import get_family
from ..model.formula import request_spec, variables
from ..model.frame import complete_rows
from ..model.labels import number_rows
from ..model.options import MIN_GROUP
from ..model.spec import Schema
from ..model.transforms import is_stateful
from . import rules
from .audit import AuditLog
from .limits import Limits
from .requests import check_oneshot, check_setup
from .rules import SiteConfig
from .secagg import SecureAggregation
from .own_fit import KEPT, KEPT_DESIGN, kept_design
from .own_third import reply_third
from .warm import warm_start
from .summaries import summarize


class Site:
    """One institution's data behind the protocol."""

    def __init__(self, site_id: str, frame: pd.DataFrame, min_group: int = MIN_GROUP,
                 config: SiteConfig | None = None, audit: AuditLog | str | None = None):
        """``config=None``: no rules but ``min_group`` for one-shot blocks (:meth:`SiteConfig.permissive`);
        with a config, its ``min_group`` governs.  ``audit``: an :class:`AuditLog` or its path (default:
        the config's ``audit_log``, if any)."""
        self.site_id = str(site_id)
        self.frame = number_rows(frame)      # messages name rows as the user's file or frame numbers them
        self.config = SiteConfig.permissive(min_group) if config is None else config
        self.min_group = int(self.config.min_group)   # smallest group whose own outputs may leave
        if audit is None and self.config.audit_log:
            audit = self.config.audit_log
        self.audit = AuditLog(audit) if isinstance(audit, (str, Path)) else audit
        self.design = None
        self.family = None
        self._engines: EngineCache | None = None
        self._described = None       # the formula (and na_action) the frame was last checked for
        self._rows = None            # (formula, na_action) -> (the rows the model uses, rows omitted)
        self._setup_bytes = None     # the set-up request the current design was built from
        self._setup_frame = None     # and the rows it was built on
        self._own_design = None      # (rows, coding, design) of the last one-shot request's own fit
        self.limits = Limits(self.site_id, self.config)
        self.secagg = SecureAggregation(self.site_id)
        self._session = None         # the coordinator session of the request being answered

    # --- the boundary -------------------------------------------------------------------------------
    def handle(self, data: bytes, session=None) -> bytes:
        """Answer one encoded request with one encoded reply (and log both when auditing).

        ``session`` names the coordinator session the request came in (the Flower run; None in-process):
        evaluate and finalize are answered only within a fit set up in the same session."""
        self._session = session
        with single_blas():              # BLAS at one thread: sites answer in parallel (likelihood/blas.py)
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
                shown = str(kind).encode("unicode_escape").decode("ascii")[:40]    # one line, whatever it holds
                raise FedGLMMError(f"site '{self.site_id}': unknown request '{shown}'")
            self.secagg.check(kind, req, self.config, self.limits.refuse)
            reply = self.secagg.apply(kind, req, handler(req), data)
        except FedGLMMError as exc:
            reply = {"error": str(exc)}
        except protocol.ProtocolError as exc:
            reply = {"error": f"site '{self.site_id}': refused a malformed request ({exc})"}
        except Exception as exc:      # nothing but a one-line reply may leave the site, never a traceback
            reply = {"error": f"site '{self.site_id}': could not answer the request: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        return reply, kind if isinstance(kind, str) else None

    def _allowed_only(self, description: dict) -> None:
        """With an allowed-columns rule, no other column's name leaves."""
        if self.config.allowed_columns is not None:
            description["columns"] = {c: k for c, k in description["columns"].items()
                                      if c in self.config.allowed_columns}

    def _used_rows(self, req, spec) -> tuple[pd.DataFrame, int]:
        """The rows the model uses -- those with a value in every column it names, unless the request says
        ``na_action: "fail"`` -- and how many were omitted.  The rules apply to the rows that remain."""
        key = (req["formula"], req.get("na_action", "omit"), req.get("weights"), req.get("offset"))
        if self._rows is None or self._rows[0] != key:
            rules.check_frame(self.config, self.site_id, spec, self.frame)     # allowed columns first
            frame, omitted = complete_rows(self.frame, variables(spec), f"site '{self.site_id}'", key[1])
            self._rows = (key, frame, omitted)
        _, frame, omitted = self._rows
        rules.check_frame(self.config, self.site_id, spec, frame)
        return frame, omitted

    # --- handlers -----------------------------------------------------------------------------------
    def _on_describe(self, req):
        spec = request_spec(req)
        frame, omitted = self._used_rows(req, spec)
        desc = describe_frame(frame, spec, self.site_id)
        rules.check_cells(self.config, self.site_id, spec, frame)
        self._allowed_only(desc)
        out = {"site": self.site_id, **desc}
        if omitted:
            out["omitted"] = omitted
        if is_stateful(spec):        # sums for the pooled state of center(), scale(), poly(), ...
            out["transforms"] = transform_statistics(spec, frame, f"site '{self.site_id}'")
        self._described = self._rows[0]
        return out

    def _on_oneshot(self, req):
        spec = request_spec(req)
        frame, omitted = self._used_rows(req, spec)
        check_oneshot(self.site_id, req)
        self.limits.open_fit(self._session, frame, "oneshot")
        msg = summarize(frame, req["formula"], req["family"], req.get("link"), self.site_id, order=req.get("order"),
                        min_group=self.min_group, local=req.get("local"), transforms=req.get("transforms"),
                        weights=spec.weights, offset=spec.offset_column, kept=(kept := {}),
                        min_pooled=int(self.config.min_pooled), own_modes=self.config.own_fit_modes)
        # the own fit's modes stay here: they start this site's engine in the first Newton round; and its
        # design (without an own fit, read off the one-shot design), which is the set-up's where the site has
        # every level of the agreed coding
        local = msg["local"] if isinstance(msg.get("local"), dict) else {}
        self._warm, self._own_design = local.pop(KEPT, None), local.pop(KEPT_DESIGN, None)
        if self._own_design is None and kept:
            self._own_design = kept_design(frame, spec, get_family(req["family"], req.get("link")), self.site_id,
                                           req.get("transforms"), **kept)
        rules.check_cells(self.config, self.site_id, spec, frame)
        self._allowed_only(msg["description"])
        if omitted:
            msg["description"]["omitted"] = omitted
        sums = msg["sums"]
        rules.check_model(self.config, self.site_id, spec, msg["n"], _agreed_width(msg["x_names"]),
                          int(np.sum(msg["theta_mask"])), get_family(req["family"], req.get("link")),
                          sums.get("st_sy"), sums.get("st_sv"))
        return msg

    def _on_keys(self, req):
        """Only the key exchange of secure aggregation (the key is added by :meth:`SecureAggregation.apply`)."""
        return {}

    def _on_setup(self, req):
        self._build(req)
        return setup_reply(self.design, self.family)

    def _build(self, req) -> None:
        """The design in the agreed coding, the rules' checks, and the engines (the set-up request)."""
        spec = request_spec(req)
        self.design, self.family, self._engines, self._setup_bytes = None, None, None, None
        frame, _ = self._used_rows(req, spec)
        family, sch = get_family(req["family"], req.get("link")), req["schema"]
        schema = Schema(kinds=dict(sch["kinds"]), levels={k: list(v) for k, v in sch["levels"].items()},
                        transforms=dict(sch.get("transforms", {})))
        self.family = family
        kept, self._own_design = self._own_design, None
        if kept is not None and kept[0] is frame and kept[1] is not None and kept[1] == coding_key(spec, schema, family):
            d = kept[2]          # the own fit's design of these rows, in the same coding
        else:
            d = build_design(spec, schema, frame, family, self.site_id, checked=self._described == self._rows[0])
        rules.check_cells(self.config, self.site_id, spec, frame)
        rules.check_model(self.config, self.site_id, spec, d.n, d.X.shape[1], int(np.sum(d.theta_mask)), family,
                          float(d.y.sum()), float(d.trials.sum()))
        nagq, curvature = check_setup(self.site_id, req, d)
        fused.prefetch(d, family, nagq)          # the compiled kernel, if this design will use it
        self.limits.open_fit(self._session, frame, "setup")
        self.design = d
        self._setup_bytes = protocol.encode({k: v for k, v in req.items() if k != "secagg"})
        self._setup_frame = frame
        shared = req["schema"].get("shared") or None
        self._engines = EngineCache(lambda A, zs: make_engine(d, family, nagq, curvature, A, zs, shared))

    def _engine_for(self, req):
        """The likelihood engine on the coordinator's internal scale (X̃ = X·transform, Z̃ = Z / zscale)."""
        self.limits.check_use(req["kind"], self._session, req, self.design if self._engines is not None else None)
        eng = self._engines.get(req["transform"], req.get("zscale", np.ones(0)))
        warm, self._warm = getattr(self, "_warm", None), None
        if warm is not None:
            warm_start(eng, self.design, *warm, transform=req["transform"], zscale=req.get("zscale"))
        return eng

    def _ride_setup(self, req):
        """A set-up payload may ride on an evaluate / finalize / inspect request (hybrid fits, and the
        rounds after a fit); the design is rebuilt only if it differs from the one built last.  Its set-up
        sums are not needed then (no reply carries them), so they are not computed."""
        if "setup" in req and not isinstance(req["setup"], dict):
            raise FedGLMMError(f"site '{self.site_id}': refused a malformed request (setup is not a request)")
        if "setup" not in req:
            return
        if protocol.encode(req["setup"]) != self._setup_bytes:
            self._build(req["setup"])
        else:
            self.limits.ride(self._session, self._setup_frame)

    def _shared_cells(self, req, eng) -> None:
        """With rules, a shared level's rows here (a (level, site) cell) below ``min_group`` leave only in
        masked sums: an unmasked request is refused (the sums of the shared block are per cell)."""
        split = getattr(eng, "split", None)
        if split is None or not self.config.withhold_modes or "secagg" in req:
            return
        for factor, cells in split.cells.items():
            small = {lv: n for lv, n in cells.items() if n < self.min_group}
            if small:
                level = min(small, key=lambda lv: (small[lv], lv))
                rules.refuse(self.config, self.site_id, f"group '{factor}' level '{level}' (shared with other sites) "
                             f"has {small[level]:g} observation(s) here, fewer than min_group {self.min_group}: its "
                             "sums leave only under secure aggregation", "min_group")

    @staticmethod
    def _masked_layout(req, eng, sums: dict) -> dict:
        """Shared sums travel in the site's own layout, but masked ones in the global layout (to add up)."""
        if "secagg" not in req or "scols" not in sums:
            return sums
        return eng.to_global(sums) if hasattr(eng, "to_global") else to_global(sums, eng.Q)

    def _points(self, req, eng) -> list:
        """The sums at each requested point (a GLMM with shared levels: with the coordinator's Γ̂ at each)."""
        points = np.asarray(req["points"], float)
        if "gammas" not in req:         # (the third derivatives at the points asked for, from their warm modes)
            return [reply_third(eng, x, req, self._masked_layout(req, eng, eng.sums(x)), i)
                    for i, x in enumerate(points)]
        gammas = np.asarray(req["gammas"], float)
        if not isinstance(eng, SharedGLMMSums) or gammas.shape != (len(points), eng.Q, eng.Q):
            raise FedGLMMError(f"site '{self.site_id}': refused a malformed request (gammas)")
        return [self._masked_layout(req, eng, eng.sums(x, gamma=g)) for x, g in zip(points, gammas)]

    def _on_evaluate(self, req):
        self._ride_setup(req)
        eng = self._engine_for(req)
        self._shared_cells(req, eng)
        return {"points": self._points(req, eng)}

    def _on_finalize(self, req):
        self._ride_setup(req)
        eng = self._engine_for(req)
        self._shared_cells(req, eng)
        point = np.asarray(req["point"], float)
        if "gammas" in req:             # a GLMM with shared levels: the final points, and the local modes
            reply = {"points": self._points(req, eng)}
            modes, sds = eng.modes(point, shared=(None, req["shared_G"]))
            # their derivatives in the site's own ψ (its shared columns, β, θ): not under secure
            # aggregation, where which shared levels a site holds stays hidden
            derivs = eng.mode_derivatives(point, points=req["points"], gammas=req["gammas"]) \
                if req.get("derivatives") and "secagg" not in req else None
            reply.update(self._factor_modes(modes, sds, eng.split, derivs))
            return reply
        reply = reply_third(eng, point, req, self._masked_layout(req, eng, eng.sums(point, final=True)))
        d = self.design
        if d.Z.shape[1] == 0:
            return reply
        given = (req["shared_v"], req["shared_N"]) if "shared_v" in req else None
        if given is not None:           # levels shared by sites: the local modes given the shared ones
            modes, sds = eng.modes(req["point"], req.get("beta_internal"), req.get("sigma"), given)
        else:
            modes, sds = eng.modes(req["point"], req.get("beta_internal"), req.get("sigma"))
        split = getattr(eng, "split", None)
        if d.factors or split is not None:
            # the modes' derivatives (with shared levels: in the site's own shared columns, which stay hidden
            # under secure aggregation)
            wanted = req.get("derivatives") and hasattr(eng, "mode_derivatives") and \
                (split is None or given is not None and "secagg" not in req)
            derivs = None if not wanted else \
                eng.mode_derivatives(point, req.get("beta_internal"), req.get("sigma"), *([given] if given else []))
            reply.update(self._factor_modes(modes, sds, split, derivs))
            return reply
        out = {"modes": np.asarray(modes), "condsd": np.asarray(sds)}
        if req.get("derivatives") and isinstance(eng, GLMMLikelihood):
            # their derivatives in the parameters: the coordinator moves them to its final estimate
            dm, ds = mode_derivatives(eng, point, sds=req["derivatives"] != "modes")
            out.update({"dmodes": dm, **({"dcondsd": ds} if ds is not None else {})})
        if not self.config.withhold_modes:
            reply.update({"levels": list(d.group_levels), **out})
            return reply
        keep = rules.group_sizes(d, self.family) >= self.min_group
        levels = np.asarray(d.group_levels, dtype=object)
        # a withheld group's label was already sent in `describe`; nothing computed for it is sent
        reply.update({"levels": levels[keep].tolist(), **{k: v[keep] for k, v in out.items()},
                      "withheld": levels[~keep].tolist()})
        return reply

    def _on_inspect(self, req):
        from . import diagnostics as inspect

        self._ride_setup(req)
        eng = self._engine_for(req)
        d, out = self.design, {}
        if (len(d.groupings) > 1 or hasattr(eng, "split")) and set(req.get("what", [])) & {"residuals", "posterior"}:
            raise FedGLMMError(f"site '{self.site_id}': residual diagnostics and posterior means are made for "
                               "one grouping factor (whose levels each live at one site)")
        for item in req.get("what", []):
            if item == "fingerprint":
                out["fingerprint"] = inspect.fingerprint(d, self._row_positions(req["setup"]))
            elif item == "residuals":
                out["residuals"] = inspect.residuals(d, self.family, eng, req, self.config.min_cell)
            elif item == "posterior":
                out["posterior"] = self._posterior(eng, req)
            else:
                raise FedGLMMError(f"site '{self.site_id}': unknown inspection '{item}'")
        return out

    def _row_positions(self, setup: dict) -> np.ndarray:
        """Positions in the site's frame of the rows the model of ``setup`` uses."""
        frame, _ = self._used_rows(setup, request_spec(setup))
        index = self.frame.index
        if index.is_unique:
            return index.get_indexer(frame.index)
        return np.flatnonzero(index.isin(frame.index))

    def _posterior(self, eng, req):
        """Posterior means and SDs of each group's random effects (withheld as the conditional modes)."""
        d = self.design
        if d.Z.shape[1] == 0:
            return {"levels": [], "mean": np.zeros((0, 0)), "sd": np.zeros((0, 0))}
        from .diagnostics import posterior

        mean, sd = posterior(eng, req)
        levels = np.asarray(d.group_levels, dtype=object)
        keep = np.ones(len(levels), bool) if not self.config.withhold_modes else \
            rules.group_sizes(d, self.family) >= self.min_group
        return {"levels": levels[keep].tolist(), "mean": mean[keep], "sd": sd[keep],
                "withheld": levels[~keep].tolist()}

    def _factor_modes(self, modes: dict, sds: dict, split=None, derivs: tuple | None = None) -> dict:
        """With several grouping factors: each factor's levels, modes and SDs (dictionaries by factor),
        the modes of levels below ``min_group`` withheld per factor.  With levels shared by sites
        (``split``), only the site's own levels: the coordinator reports the shared ones.  ``derivs``: the
        modes' and SDs' derivatives in the parameters (dictionaries by factor), sent beside them (with shared
        levels, with the site's shared columns they are in, ``dcols``)."""
        d, out = self.design, {"levels": {}, "modes": {}, "condsd": {}}
        if derivs is not None:
            out.update({"dmodes": {}, **({"dcondsd": {}} if derivs[1] is not None else {})})
            if split is not None:
                out["dcols"] = np.asarray(split.cols, dtype=np.int64)
        withheld = {}
        sizes = rules.factor_sizes(d, self.family)
        for f in d.groupings:
            own = np.ones(len(f.levels), bool) if split is None else \
                np.isin(np.asarray(f.levels, dtype=str), np.asarray(split.local_levels[f.name], dtype=str))
            size = np.asarray(sizes[f.name])[own]
            keep = size >= self.min_group if self.config.withhold_modes else np.ones(len(size), bool)
            levels = np.asarray(f.levels, dtype=object)[own]
            out["levels"][f.name] = levels[keep].tolist()
            out["modes"][f.name] = np.asarray(modes[f.name])[keep]
            out["condsd"][f.name] = np.asarray(sds[f.name])[keep]
            for key, x in zip(("dmodes", "dcondsd"), derivs or ()):
                if x is not None:            # (given for the site's own levels, as the modes)
                    out[key][f.name] = np.asarray(x[f.name])[keep]
            if not keep.all():
                withheld[f.name] = levels[~keep].tolist()
        if withheld:
            out["withheld"] = withheld
        return out


def _agreed_width(x_names) -> int:
    """The number of fixed-effect columns in the agreed coding, from a one-shot message's own coding (a
    column for every level of a factor, reference included): one fewer per factor term when there is an
    intercept."""
    factors = {name.rsplit("[", 1)[0] for name in x_names if "[T." in name}
    return len(x_names) - (len(factors) if "Intercept" in x_names else 0)
