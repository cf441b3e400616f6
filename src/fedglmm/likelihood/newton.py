"""The trust-region Newton method both sides run, driven one round (one batch of points) at a time.

It minimises F from the value, gradient and Hessian at the points it asks for: the sites' sums (the
coordinator's rounds), or an engine evaluated locally (a site's own fit, the coordinator's pseudo-data
fit).  The interface is ask/tell, so the caller owns the communication, and a round may carry several
points:

    opt = TrustRegionNewton(x0, starts=[...])
    xs = opt.starts
    while xs:
        results = [(f, g, H) at each x in xs]      # one round
        xs = opt.tell(xs, results)
    opt.solution, opt.converged

The step solves min gᵀs + ½ sᵀHs subject to ‖Ds‖ ≤ Δ, with D = sqrt|diag H| (so Δ is in units of
approximate standard errors), through an eigen-decomposition of the small P×P Hessian; a step is
accepted when the actual decrease is a fair share of the predicted one (Moré & Sorensen 1983; Nocedal &
Wright 2006, Alg. 4.1).  Rounds between institutions cost far more than local arithmetic, so while the
quadratic model is not trusted (an indefinite Hessian, a rejected or poorly predicted step) a round
carries the trust-region steps for the radii Δ/4, Δ and 4Δ, and the best point is kept: one round
does what would otherwise take several radius updates.  Once the Hessian is positive definite and
steps are accepted, each round carries the single Newton step (with shorter ones where every step of the
round is long: :func:`~fedglmm.likelihood.candidates.hedges`).

Convergence: once the Newton decrement gᵀH⁻¹g at an accepted point with a positive-definite Hessian
falls below ``near``, the full Newton step is proposed as the *final candidate* (``opt.final_candidate``
is True, so the caller can ask for everything it wants at the end in that same round); if the decrement
there is below ``tol`` the iteration stops, otherwise it goes on.  The solution (``solution``) is that
last evaluated point (``point``) plus one more step, Newton's to third order or in the covariance's
entries (:mod:`~fedglmm.likelihood.last_step`): its error is far below the decrement (≤ 1e-7).  Those final
rounds' methods are in :mod:`~fedglmm.likelihood.newton_end`; the candidates that move the covariance otherwise
than Newton in θ does (in Σ's entries, turns off a saddle) in :mod:`~fedglmm.likelihood.newton_covariance`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..model.options import NewtonConfig
from .boundary import boundary_step, face_decrement, face_step
from .candidates import MODEL_REACH, Candidate as _Candidate, State as _State, hedges, radius_scale, \
    radius_step, scaled_norm, unbounded as _unbounded
from .steps import alpha_predicts, capped, held, log_scale_step, tail_step
from .newton_covariance import CovarianceMoves
from .newton_end import Ending
from .start_choice import best_start, held_step, newton_step as _newton_step


@dataclass
class TrustRegionNewton(CovarianceMoves, Ending):
    x0: np.ndarray
    config: NewtonConfig = field(default_factory=NewtonConfig)
    evals: int = 0
    converged: bool = False
    solution: np.ndarray | None = None
    point: np.ndarray | None = None
    message: str = ""
    history: list = field(default_factory=list)
    trace: list = field(default_factory=list)    # (round, objective, Newton decrement gᵀH⁻¹g) per round

    starts: list | None = None      # further starting points, evaluated in the first round with x0
    model: object = None            # optional model(x, f, g, H) -> (step, predicted decrease) or None;
                                    # its optional model.observe(x, f, g, H) sees every point evaluated
    boundary: tuple = ()            # coordinates whose sign does not matter (F is even in each): 0 is a
                                    # boundary a Newton iteration approaches only linearly (see _boundary)
    covariance: object = None       # optional steps in the covariance's entries (see _in_covariance)
    tails: tuple = ()               # coordinates ψ whose F flattens like e^(−ψ) towards ψ = ∞ (see _tail)
    predict_final: bool = False     # also propose the final candidate where the observed quadratic
                                    # contraction predicts a decrement below tol after the step (_promising)
    final_first: bool = False       # x0 is believed to be the solution: the first round (x0 alone) is final
    sound_start: bool = False       # of several starts, prefer one with a positive-definite Hessian
    faces: bool = False             # while H is indefinite along a coordinate of ``boundary`` alone, also try
                                    # that coordinate at 0 (see _face)
    fixed: int = 0                  # how many leading coordinates are fixed effects (the choice of start
                                    # compares starts with those profiled: start_choice.best_start)
    uncertain: object = None        # optional uncertain(x) -> bool: F at x was known only approximately, and
                                    # evaluating x again gives it more precisely (see _refresh)
    third_dear: bool = False        # F's third derivatives cost the sites many evaluations (see _final)
    held: int = 0                   # while H is indefinite, a step in this many leading coordinates alone (_face)

    def __post_init__(self):
        self.x0 = np.asarray(self.x0, float)
        self.starts = [self.x0] + [np.asarray(x, float) for x in (self.starts or [])]
        self.final_candidate = bool(self.final_first) and len(self.starts) == 1
        self._cur: _State | None = None
        self._radius: float | None = None
        self._cands: list[_Candidate] = []
        self._trusted = False
        self._ceiling = np.inf             # candidates stay shorter than the shortest step just rejected
        self.accepted: int | None = None   # index of the point of the last round that was accepted
        self._model_ok = True               # False after a rejected round, until a point is accepted
        self._final_model = False           # the last final candidate was the caller's model's step
        self._near_cov = None               # (point, its step in Σ's entries, also over a step to third order) for
                                            # a final candidate there (see _in_covariance)
        self._model_rejections = 0
        self._dec_prev = np.inf     # the current point's Newton decrement a round before (on a face: face_decrement)
        self.previous: _State | None = None  # the accepted point before the current one
        self._settling = False              # one more final round was taken to settle the last step
        self._step = np.inf                 # the scaled length of the last accepted step
        self._rho: float | None = None      # actual / predicted decrease of the last round's full step
        self._tail_from: _State | None = None   # the point the last step in e^(−ψ) was proposed from
        self._cov_won = False               # the step accepted last was one in Σ's entries or a turn
        self._refreshing = False            # the round asked for carries the current point again, last
        # the next round brings F's third derivatives (_third_wanted, _final; the first: _third_at_starts) ...
        self.want_third, self.third_cov = self._third_at_starts()
        self.third_points = list(range(len(self.starts)))   # ... at these of its points (_third_points; a final
                                                            # round: at its point, the caller's final_third)
        self.final_third: np.ndarray | None = None      # (see _third_last)
        self._third_step: np.ndarray | None = None      # the last step to third order, where it ends the fit
        self.third_used: np.ndarray | None = None       # ... and the third derivatives it was made with
        self.point_third: list | None = None    # those at each point of a round that asked (see _third_final)
        self._third_more: list = []         # the steps to third order from the current point, as candidates
        self._turned: _State | None = None  # the point turned from last while H was positive definite

    @property
    def current(self) -> _State | None:
        return self._cur

    def tell(self, xs, results) -> list[np.ndarray] | None:
        """Record one round (the points asked for and their (f, g, H)); return the next points or None."""
        self.evals += 1
        pts = [(np.asarray(x, float), float(f), *held(np.asarray(x, float), np.asarray(g, float),
                                                      np.asarray(H, float), self.boundary, self.tails))
               for x, (f, g, H) in zip(xs, results)]
        ok = [np.isfinite(f) and np.all(np.isfinite(g)) and np.all(np.isfinite(H)) for _, f, g, H in pts]
        self._refresh(pts, ok)
        was_final, self.final_candidate, self.accepted = self.final_candidate, False, None
        self._observe(pts, ok)
        if self._cur is None:
            finite = [i for i in range(len(pts)) if ok[i]]
            if not finite:
                self.message = "the objective is not finite at the starting values"
                return self._finish(converged=False)
            best = best_start(pts, finite, self.fixed) if self.sound_start else min(finite, key=lambda i: pts[i][1])
            self._cur, self.accepted = _State(*pts[best]), best
        else:
            finite = [i for i in range(len(pts)) if ok[i]]
            best = min(finite, key=lambda i: pts[i][1]) if finite else None
            cand = self._cands[best] if best is not None else None
            rho = self._ratio(cand, pts[best][1], was_final) if cand is not None else -np.inf
            self._rho = rho if cand is not None and cand.full else None
            if rho >= self.config.accept:
                self._accept(pts[best], best, cand, rho)
            else:
                self._rejected(was_final)
                self._refreshing = self.uncertain is not None and bool(self.uncertain(self._cur.x))
                if not self._refreshing and max(c.pred for c in self._cands) < 1e-13 * max(1.0, abs(self._cur.f)):
                    # the model predicts no measurable gain: the current point is as good as it gets
                    return self._finish(converged=True)
        self.history.append((self.evals, self._cur.f))
        cur = self._cur
        newton = _newton_step(cur.g, cur.H)
        dec = -(cur.g @ newton) if newton is not None else np.inf
        self.trace.append((self.evals, float(cur.f), float(dec)))
        if was_final and self.accepted is not None and (self._ends(cur, newton, dec) or dec < self.config.tol):
            return self._stop_or_settle(cur, newton)
        dec_before, self._dec_prev = self._dec_prev, dec if newton is not None else face_decrement(cur, self.boundary)
        self._model_fell_short(was_final, dec, dec_before)
        self.want_third = self._third_wanted(dec, dec_before)       # (a final round's: see _final)
        if self.evals >= self.config.max_evals:
            self.message = f"no convergence within {self.config.max_evals} rounds"
            return self._finish(converged=False)
        # the caller's model only where the Newton step may fall short (it costs local work)
        extra = self._model_step(cur, newton=newton) \
            if newton is not None and self._model_ok and dec >= self.config.tol ** 0.5 else None
        edge = self._boundary(cur, newton)      # (a final candidate just rejected is not proposed again)
        tail = self._tail(cur, newton)
        cov = self._in_covariance(cur, newton, self._linear(cur, newton, dec, dec_before), edge is not None) \
            if dec >= self.config.tol else None
        turns = self._turns(cur, newton, cov)
        third = self._third_final(cur, newton, dec, edge, cov is None and not turns)
        if not turns and (third is not None or cov is None and not (was_final and self.accepted is None) and (
                dec < self.config.near or extra is not None and dec < self.config.near_model
                or self._promising(dec, dec_before))):
            # the poisson limit is a final candidate as a zero variance's boundary point is
            return self._final(cur, newton, dec, third or extra, self._final_edge(cur, edge, tail, third))
        self._cands = self._propose(cur.g, cur.H, newton, extend=cov is None)
        if extra is not None:
            extra.radius = self._radius
            if self._trusted and len(self._cands) == 1 and extra.norm <= self._radius \
                    and dec < getattr(self.model, "newton_beside", np.inf):
                # the model has the Newton step's information and more: it alone, while steps succeed
                self._cands = []
            self._cands.insert(0, extra)
        grow = self._log_scale(cur, newton) if dec >= self.config.near and edge is None else None
        tail = tail if dec >= self.config.near else None
        self._cands += [c for c in (edge, cov, grow, tail, *self._third_more) if c is not None] \
            + turns \
            + self._face(cur, newton)
        self.third_points = self._third_asked(extra, newton)
        if self.config.hedge and not self.config.single:
            self._cands += hedges(self._cands, cur.g, cur.H, newton, self.config.spread)
        return [capped(cur.x + c.step, self.tails, cur) for c in self._cands] + ([cur.x] if self._refreshing else [])

    def _observe(self, pts: list, ok: list) -> None:
        """Show the caller's model every finite point of the round (its optional ``observe``)."""
        observe = getattr(self.model, "observe", None)
        if observe is not None:
            for (x, f, g, H), good in zip(pts, ok):
                if good:
                    observe(x, f, g, H)

    def _refresh(self, pts: list, ok: list) -> None:
        """Where the round carried the current point again (last; see ``uncertain``): take it off the
        round's points, as the current point's value, gradient and Hessian if finite.  Asked for after a
        round whose steps all failed, at a point whose F was known only approximately: too low there, F
        would have no step beat it."""
        if self._refreshing:
            self._refreshing = False
            again, good = pts.pop(), ok.pop()
            if good:
                self._cur = _State(*again)

    def _accept(self, pt, index: int, cand: _Candidate, rho: float) -> None:
        """Move to the round's best point ``pt`` (the candidate ``cand``, ratio ``rho``) and set the radius."""
        if not cand.settle:        # (a settling step is not the last move: the one before it tells more)
            self.previous = self._cur
        self._cur, self.accepted, self._step = _State(*pt), index, cand.norm
        self._cov_won = cand.cov
        if not np.isfinite(cand.radius):
            # a final-candidate Newton step carries no radius: keep the one in force
            self._radius = self._radius if self._radius is not None else self.config.radius0
        elif rho > 0.75 and cand.norm > 0.99 * cand.radius:
            self._radius = 2.0 * cand.radius
        elif rho < 0.25:
            self._radius = 0.5 * cand.norm
        else:
            self._radius = cand.radius
        self._trusted = rho >= 0.25
        self._ceiling = np.inf
        self._model_ok = self._model_rejections < 2    # a model twice wrong is not asked again

    def _boundary(self, cur, newton) -> _Candidate | None:
        """Where the Newton step shrinks a coordinate of ``boundary`` by more than half (a quarter where the step
        accepted last shrank it so too, with one grouping factor): the step of the model in its square, onto 0
        where that model's minimum lies beyond (:func:`boundary_step`)."""
        before = None if self.accepted is None or self.previous is None or self.third_dear else self.previous.x
        out = None if newton is None else boundary_step(cur.x, cur.g, cur.H, newton, self.boundary, before)
        return None if out is None else _unbounded(*out, cur.H)

    def _face(self, cur, newton) -> list[_Candidate]:
        """While H is indefinite, further candidates: along one coordinate of ``boundary`` alone, that coordinate
        at 0 and the rest at their model's minimum there (:func:`face_step`; a step onto a face of Σ, as a turn
        is: the next round also tries the step in Σ's entries, :meth:`_in_covariance`); with several grouping
        factors (``held``), the fixed effects' Newton step with θ held (:func:`held_step`):
        benchmarks/nested_sites_rounds.py draws 0-99 522 -> 512 rounds (draw 1, six hospitals, 12 -> 6), none
        longer; parity_multilevel.py (one site per unit, over 3 sites) and reference_splits.py as before."""
        if newton is not None or self.config.single:
            return []
        face = face_step(cur.x, cur.g, cur.H, self.boundary) if self.faces and self.boundary else None
        held = held_step(cur.g, cur.H, self.held) if self.held else None
        return ([] if face is None else [replace(_unbounded(*face, cur.H), cov=True)]) \
            + ([] if held is None else [_unbounded(*held, cur.H)])

    def _fell_short(self) -> bool:
        """Whether the last round's full step (Newton's, or another model's taken whole: in log scale, in Σ's
        entries -- where it gained more than it promised F flattens ahead as well; toenail with every patient
        a site, rounds_heldout.py --splits each: 9 -> 8 rounds, the iterative method 10 -> 9; then the Newton
        step doubled alone, not also quadrupled: cbpp_cloglog by the iterative method sent 10 % more bytes
        for the same rounds with both) gained more than ``extrapolate`` times its prediction."""
        cfg = self.config
        return bool(cfg.extrapolate) and not cfg.single and self._rho is not None and self._rho > cfg.extrapolate

    def _log_scale(self, cur, newton) -> _Candidate | None:
        """Where the Newton step grows a standard deviation: its step in log scale
        (:func:`~fedglmm.likelihood.steps.log_scale_step`), as one more candidate."""
        if not self.config.log_steps or self.config.single or newton is None or self.covariance is None:
            return None
        out = log_scale_step(cur.x, cur.g, cur.H, newton, self.covariance.diagonal)
        return _unbounded(*out, cur.H) if out is not None else None

    def _tail(self, cur, newton) -> _Candidate | None:
        """A negative binomial's step in α = e^(−ψ) (:func:`~.steps.tail_step`), as one more candidate."""
        if not self.tails or self.config.single or self._tail_from is cur:
            return None           # (at a point it was tried from already: its step is known to fail)
        self._tail_from = cur
        out = tail_step(cur.x, cur.g, cur.H, newton, self.tails, alpha_predicts(self.previous, cur, self.tails),
                        self.boundary)
        return None if out is None else replace(_unbounded(*out[:2], cur.H), limit=out[2])

    def _model_step(self, cur, final: bool = False, newton=None) -> _Candidate | None:
        """The step of the caller's model of F (e.g. a surrogate that the quadratic model corrects), as one
        more candidate of the round."""
        if self.model is None:
            return None
        out = self.model(cur.x, cur.f, cur.g, cur.H)
        if out is None:
            return None
        step, pred = np.asarray(out[0], float), float(out[1])
        if not (np.all(np.isfinite(step)) and np.isfinite(pred) and (pred > 0 or final)):
            return None
        norm = scaled_norm(step, cur.H)
        if newton is not None and norm > MODEL_REACH * scaled_norm(newton, cur.H) + 1e-12:
            return None           # the model and the sites' quadratic model disagree too much to try it
        return _Candidate(step, pred, norm, np.inf)

    def _linear(self, cur, newton, dec: float, d0: float) -> bool:
        """Whether full Newton steps converge only linearly: the last one shrank the decrement by less than
        a tenth (a distance ratio √(d/d₀) above 0.3) and the new step does not turn back -- a nearly
        degenerate optimum, where F is far from quadratic in θ (e.g. a covariance close to singular)."""
        if newton is None or self.previous is None or self.accepted is None or not self._cands:
            return False
        if not self._cands[self.accepted].newton or not (0 < dec < d0 < np.inf) or dec < 0.09 * d0:
            return False
        last = cur.x - self.previous.x
        return bool(last @ cur.H @ last > 0 and newton @ cur.H @ last >= 0)

    def _propose(self, g, H, newton, extend: bool = True) -> list[_Candidate]:
        d = radius_scale(H)
        nn = float(np.linalg.norm(d * newton)) if newton is not None else np.inf
        if self._radius is None:
            self._radius = nn if newton is not None else self.config.radius0
            self._trusted = newton is not None
        elif newton is None:      # H turned indefinite: no further than twice the step that led here
            self._radius = min(self._radius, 2.0 * self._step)
        if self._trusted and newton is not None and nn <= self._radius:
            out = [_Candidate(newton, -(g @ newton + 0.5 * newton @ H @ newton), nn, self._radius, True)]
            if extend and self._fell_short():
                # the step just taken gained more than it promised: F flattens ahead, and the Newton step falls
                # short again; the longer ones carry its predicted decrease (the least to beat).  Not beside
                # the step in Σ's entries, which covers that ground (cbpp_olre: 4 points a round, not 2)
                # (after a Newton step doubled and quadrupled, after another model's doubled: the round's
                # candidates are still the last round's here, the accepted one among them)
                was_newton = self._cands[self.accepted].newton
                out += [_Candidate(f * newton, out[0].pred, nn, self._radius, True)
                        for f in ((2.0, 4.0) if was_newton else (2.0,))]
            return out
        out = []
        k = self.config.spread
        for radius in ((self._radius,) if self.config.single else (self._radius / k, self._radius, self._radius * k)):
            if out and (out[-1].norm >= nn or radius >= 0.99 * self._ceiling):
                break                             # the Newton step is in already, or this one just failed
            out.append(radius_step(g, H, d, radius))
        return out

