"""The end of the coordinator's Newton iteration (:class:`~fedglmm.likelihood.newton.TrustRegionNewton`, which
takes these methods from :class:`Ending`): the final candidate, the ratio that accepts it, when to stop or
settle the last step with one more final round, and the solution -- the last point plus one more step, from
the caller's model, to third order or in the covariance's entries (:mod:`~fedglmm.likelihood.last_step`)."""
from __future__ import annotations

import numpy as np

from .boundary import boundary_last
from .candidates import Candidate as _Candidate, unbounded as _unbounded
from .last_step import last_step, quartic_along_move
from .start_choice import newton_step as _newton_step
from .steps import capped, even_third
from .third_requests import points_asked
from .third_steps import third_steps


THIRD_LAST = 1e-5         # a final point's decrement below which the last step to third order may end the fit
THIRD_LAST_DEAR = 5e-7    # ... with several grouping factors (no QUARTIC: their iterations' Hessians are forward
                          # differences, which put 0.01 |T| / dᵀHd into _quartic; sim_mc_binary_la over 3 sites 5 -> 6)
QUARTIC = 3e-8            # ... where the fourth derivatives times it stay below this (_quartic; THIRD_LAST was 5e-7
                          # without it: rounds_heldout.py 630 -> 628 rounds with both, 625 with the sites' Q[v, v])
THIRD_LAST_OFF = 5e-7     # ... and from this decrement, only where the last step runs within OFF_SHARE (its share in
OFF_SHARE = 0.25          # the norm of H) of the direction whose fourth derivatives are known: off it they may be far
                          # larger (sim_epil_la as a negative binomial over 3 sites, its last move 23 long in ψ to the
                          # poisson limit, the last step across it from 5.3e-6: standard errors 4.8e-8 off)
THIRD_NEAR = 0.3          # a decrement below which a point's third derivatives make the final candidate ...
                          # (0.1 until a 0.1003 with land 1.5e-6 was not: grouseticks_nb one location a site)
THIRD_LAND = 2e-5         # ... where their two steps' difference (the decrement they are predicted to leave) is below
THIRD_ASK = (3e-4, 0.1)   # ... asked for at a round's points where the decrement predicted there is in this range
THIRD_FROM = (0.04, 100.0)  # ... or, from a decrement in this range reached by no step in the quadratic regime
THIRD_PARTIAL = 1.0       # (the starts' third derivatives along the covariance parameters alone: their steps from
                          # a decrement of at least this -- see _third_at_starts)
THIRD_MOVE = 1e-12        # (``third_at_final`` off: a step to third order predicted to leave more than this asks for
                          # them at its point, to move the information to the estimate -- see _final)
QUADRATIC = 0.5           # (a step from a decrement below this one is: its contraction d/d₀² predicts the next)
COV_AGREE = (1e-2, 0.01)  # below this decrement a step in Σ's entries within this share of it of Newton's: not tried
MODEL_FINAL_SHRINK = 0.1   # a final step of the caller's model that leaves more than this share of the decrement:
                           # the model is not asked again


class Ending:
    """The final-round methods of :class:`~fedglmm.likelihood.newton.TrustRegionNewton` (a mixin: the state
    they read and set is the iteration's)."""

    _kept_third = None      # (point, T): a final round's third derivatives where the iteration goes on from it
    final_direction = None  # the way the last step is predicted to go from the final candidate (its ``miss``) ...
    final_quartic = None    # ... and (v, Q[v, v]): F's fourth derivatives along it at the final point, from the sites

    def _final(self, cur, newton, dec, extra, edge) -> list:
        """The final candidate: the Newton step, the caller's model's step, or, converging onto a zero
        variance, the boundary point."""
        self.final_candidate, self._refreshing = True, False     # (a final round evaluates its point alone)
        step, pred = (newton, dec / 2.0) if extra is None else (extra.step, extra.pred)
        if edge is not None:
            step, pred = edge.step, edge.pred
        third = extra is not None and extra.land is not None          # (a step to third order: _third_final)
        self._cands = [_unbounded(step, pred, cur.H, extra is None and edge is None)]
        self._final_model = extra is not None and edge is None and not third
        self.final_direction = extra.miss if third and edge is None else None      # (see third_requests, _quartic)
        # the third derivatives at the final point, where its decrement is predicted above ``third_final`` (1e-15, as
        # likelihood.fit._newton_config sets it): the last contraction d/d₀² times d², from d₀ below near_model, else
        # 1e-3; after a step to third order a tenth of its ``land`` (those steps left land/30 to land/7).  A fit that
        # ends there without them moves the information to the estimate by the secant of the step before, and its
        # standard errors were off by 4e-4 to 4e-2 times the square root of the decrement left (5.8e-6 after 5.6e-8,
        # sim_rare_gh20 over 5 sites; 1.3e-8 after 9e-14); with them within 3e-9 of the fit continued to machine
        # precision (benchmarks/rounds_heldout.py's se_rel).  Several grouping factors (``third_dear``: Hessians that
        # are differences of gradients, a round's third derivatives along the covariance parameters alone): at every
        # final point on up to 50,000 rows and 24 parameters (``third_final`` 0: from its final point's stencil, see
        # likelihood.fit._newton_config; cbpp_olre's iterative fit ended at 1.2e-11 where 1e-17 was predicted), above a
        # tenth of tol beyond -- when P Hessians made them, at every final point they cost grouseticks' nested and olre
        # fits over 3 sites 1.2-1.36 times the time (by the stencil 0.78-1.0 times).  And always after a step onto a zero
        # variance, or to third order where they are cheap (not ``third_dear``): the last step from there is then third
        # order too (from 1e-9 after a step to third order the third derivatives of the point before left standard
        # errors 2.6e-7 off, toenail over 20 sites; from 7e-9 onto grouseticks_nested's zero SD the secant left them
        # 4e-6 off) -- ``third_at_final`` off (by quadrature, 9-24 parameters on few rows) only where that step is
        # predicted to leave more than THIRD_MOVE (from 9.5e-14, grouseticks_gh5 over 3 sites, the T it came from left
        # the standard errors 3e-13 off)
        t, cfg = self.trace, self.config
        c = t[-1][2] / t[-2][2] ** 2 if len(t) > 1 and 0 < t[-2][2] < cfg.near_model else 1e-3
        pred = extra.land / 10 if third else c * dec * dec
        self.want_third = self._may_ask_third() and (
            edge is not None or third and not self.third_dear and (cfg.third_at_final or extra.land > THIRD_MOVE)
            or pred > cfg.third_final)
        return [capped(cur.x + step, self.tails, cur)]

    def _may_ask_third(self) -> bool:
        """Whether this iteration asks for F's third derivatives at all: a fit that allows it (``final_third``), of
        more than one point a round, of at most ``third_max`` parameters (the sites' work: P Hessians each)."""
        cfg = self.config
        return cfg.final_third and not cfg.single and len(self.x0) <= cfg.third_max

    def _third_at_starts(self) -> tuple[bool, bool]:
        """Whether the first round's points bring the sites' third derivatives (NewtonConfig.third_start), and whether
        along the covariance parameters alone (``third_start_cov``; the request's ``third_cov``: the entries with an
        index among them and a dispersion, len(θ, ψ) Hessians a point at each site instead of P, the fixed effects'
        own block left 0).  From the best start of epil as a negative binomial over 10 sites (9.0 above the optimum
        in decrement) the step to third order with those alone reached 0.0029, with all of them 0.0025, Newton's
        0.9.  Their steps are no final candidates, and candidates at all only from a decrement of THIRD_PARTIAL or
        more (:meth:`_third_final`): they leave an error of third order in the fixed effects' part of the step
        (binary fits near a singular start, benchmarks/stress_methods.py fits 44 and 84: 3 -> 4 rounds as final
        candidates), and nearer, Newton's step lands close enough while they would add points to the next round
        (sleepstudy_gamma over 3 sites with rules, from 0.96: 1.3 times the time in as many rounds)."""
        cfg = self.config
        ask = (cfg.third_start or cfg.third_start_cov) and self._may_ask_third()
        return ask, ask and not cfg.third_start

    def _third_wanted(self, dec: float, d0: float) -> bool:
        """Whether the next round's points come with the sites' third derivatives (P Hessians a point at each site, by
        quadrature P(P - 1)/2 gradients beside its Hessian's; fits of at most ``third_max`` parameters), for a step to
        third order from there that may end the fit a round sooner than Newton's (:meth:`_third_final`): where the
        decrement predicted there (the last contraction d/d₀² times d², after a full step from d₀ below QUADRATIC) lies
        in THIRD_ASK, or otherwise where d lies in THIRD_FROM (from d of 1 to 4, the next decrement was 2e-3 to 0.1 on
        the GLMM splits of parity_multilevel.py: contractions of 0.002 to 0.7; from 8.9 and 12.8, 0.04 and 0.1 on
        grouseticks_la and _nb split one location per site, where the step to third order from there ended the fit a
        round sooner; up to 100, not 20: from 45 and 70, guimmun over 5 sites and toenail by quadrature every patient a
        site 5 -> 4 and 7 -> 6 rounds; the iterative method's fits of sim_salamanders took a round more, 8, and of
        toenail nAGQ 20 one fewer, 7, on every split).  A final round asks in :meth:`_final`."""
        if not self._may_ask_third() or self._cur is None:
            return False
        if self._accepted_full() and 0 < dec < d0 < QUADRATIC:
            return THIRD_ASK[0] <= dec ** 3 / d0 ** 2 <= THIRD_ASK[1]
        return THIRD_FROM[0] <= dec <= THIRD_FROM[1]

    def _rejected(self, was_final: bool) -> None:
        """No point of the round gained enough: Newton's steps are not taken whole again, nor is the caller's
        model asked, until a step succeeds; the trust region's radius shrinks to a quarter of the shortest step
        tried, which is also its ceiling (never growing while steps fail: a rejected final candidate and the
        radii after it would otherwise take turns for ever) -- but not after the caller's model's final step,
        whose failure says nothing of Newton's, which it replaced (guimmun over 10 sites went on with radii of
        0.03 and 0.1 where Newton's step was 1 long: 7 rounds, 6 without shrinking)."""
        self._trusted = False
        self._model_ok = False
        self._model_rejections += 1
        if not (was_final and self._final_model):
            self._ceiling = min(self._ceiling, min(c.norm for c in self._cands))
            self._radius = 0.25 * self._ceiling

    def _third_asked(self, extra, newton) -> list[int]:
        """The round's points with the sites' third derivatives where the round asks for them (:meth:`_third_points`),
        and, where H is indefinite (no Newton step), at its steps onto a face of Σ or in Σ's entries (``cov``), asked
        for there: from such a point, the one accepted near a zero SD, the next step is to third order.
        sim_rare_gh20 over 20 sites and over 4, 5 -> 4 rounds (its step to third order from 4e-3 the final
        candidate: ``land`` 3e-10); rounds_heldout.py's 188 fits 627 -> 626, on 4, 7b, 15 and 40 sites 301 -> 300;
        stress_methods.py, nb_poisson_limit.py and parity_multilevel.py's splits as before but one fit a round fewer."""
        faces = [i for i, c in enumerate(self._cands) if c.cov] if newton is None else []
        if faces and not self.want_third and self._may_ask_third():
            self.want_third = True
            return faces
        return self._third_points(extra)

    def _third_points(self, extra) -> list[int]:
        """The candidates whose points come with the sites' third derivatives when the next round asks for them
        (:meth:`_third_wanted`; :func:`~fedglmm.likelihood.third_requests.points_asked`)."""
        return points_asked(self._cands, extra, self.config, self._third_more)

    def _third_final(self, cur, newton, dec: float, edge, final_ok: bool = True) -> _Candidate | None:
        """From an accepted point whose third derivatives T came with it (``point_third``, asked for by
        :meth:`_third_wanted`; or a final round's, where the iteration goes on from its point: kept by
        :meth:`_third_last`), no boundary step in question: the step to third order s (g + Hs + ½T[s, s] = 0)
        and Chebyshev's s_N − ½H⁻¹T[s_N, s_N], each of which leaves an error of fourth order in the step, their
        difference its measure (``land``, in the norm of H: the decrement predicted) -- in θ or in the SDs' squares,
        whichever pair agrees better (:func:`~fedglmm.likelihood.third_steps.third_steps`).
        With d in [tol, THIRD_NEAR) and land below THIRD_LAND (``final_ok``: no step in Σ's entries wanted), their
        mean is the final candidate (returned); otherwise both are further candidates of the round
        (``_third_more``), where they gain.  The exact T's steps on the GLMM splits of parity_multilevel.py over
        3 sites: from d = 3.8 to 0.01 where Newton's reached 0.13; from 0.06 to 3e-8 where Newton's reached
        9e-5; with land from 1e-7 to 1.8e-5 the one step or the other left from land/2 to land, their mean
        from land/30 to land/7 (Newton's 20 to 200 times land).  A final round's T unused, cbpp_olre over 3 sites
        went on by Newton's step from 8e-6 to 1.2e-8 (the contraction before predicted 2e-10) and ended there with
        standard errors 7.8e-8 off the fit continued to machine precision; by the step to third order it goes to
        2e-11, its standard errors 7e-11 off (tests/test_last_step.py)."""
        T = self.point_third[self.accepted] if self.point_third and self.accepted is not None \
            and self.accepted < len(self.point_third) else None
        kept, self._kept_third = self._kept_third, None
        T = kept[1] if T is None and kept is not None and kept[0] is cur else T
        partial, self.third_cov = self.third_cov, False     # (the starts': along the covariance parameters alone)
        self.point_third, self._third_more, self.third_used = None, [], None
        T = even_third(cur.x, T, self.boundary) if T is not None else None
        steps = third_steps(cur.x, cur.g, cur.H, T, newton, self._squared) if T is not None and newton is not None \
            and edge is None and dec >= self.config.tol else None
        if steps is None:
            return None
        cheb, s, land, pred = steps.cheb, steps.s, steps.land, steps.pred
        if final_ok and not partial and dec < THIRD_NEAR and land < THIRD_LAND and pred[2] > 0:
            out = _unbounded(steps.mean, pred[2], cur.H)
            out.land, out.miss, self.third_used = land, steps.s - steps.cheb, T      # (T: see _finish)
            return out
        if partial and dec < THIRD_PARTIAL:
            return None
        # (where the step to third order is not much longer than Newton's: far from the optimum its cubic model
        # can put the root anywhere)
        reach = 2.0 * (newton @ cur.H @ newton)
        self._third_more = [_unbounded(x, p, cur.H) for x, p in zip((s, cheb), pred)
                            if p > 0 and (x - newton) @ cur.H @ (x - newton) <= reach]
        return None

    def _cov_agrees(self, cur, cov, newton) -> bool:
        """Whether the step in Σ's entries that :meth:`_in_covariance` would add to the round lands where Newton's
        does, near the optimum: the decrement d below COV_AGREE[0] and their difference below COV_AGREE[1]·d in the
        norm of H.  It is then not tried, and the round may be a final one (a round of two points is not, and only a
        final round brings the groups' conditional modes): sim_rare_gh20 over 10 and 20 sites, where at 0.004 above
        the optimum Newton's step shrinks the SD by a quarter, 5 -> 4 rounds; no other of the 188 held-out fits,
        stress_methods.py's 100 or parity_multilevel.py's over 3 sites changed."""
        d = self._dec_prev
        miss = cov.step - newton
        return d < COV_AGREE[0] and float(miss @ cur.H @ miss) < COV_AGREE[1] * d

    def _model_fell_short(self, was_final: bool, dec: float, d0: float) -> None:
        """After a final round whose point was the caller's model's step: where it left a decrement d above
        ``MODEL_FINAL_SHRINK`` of the one before, d₀ -- near the optimum a Newton step leaves one of order
        d₀² --, the model counts as wrong and is not asked again; the next final candidate is Newton's
        (grouseticks over 3 sites with count bins of neighbouring sizes: 9 rounds, 6 with this)."""
        if was_final and self.accepted is not None and self._final_model and dec > MODEL_FINAL_SHRINK * d0:
            self._model_rejections, self._model_ok = self._model_rejections + 1, False

    def _accepted_full(self) -> bool:
        """Whether the point just accepted was reached by a full step (:attr:`Candidate.full`; the round's
        candidates are still the last round's here)."""
        return self.accepted is not None and bool(self._cands) and self._cands[self.accepted].full

    def _promising(self, dec: float, d0: float) -> bool:
        """With ``predict_final``: the step just accepted was a full step from a decrement d₀ and left d
        (< near_model); its contraction c = d/d₀² predicts d' = c·d² after the next one -- one that ends the
        iteration there (below tol, or as :meth:`_contracted` accepts it: d' < 10·tol with d'³/d² < tol²;
        the 3-site splits of parity_multilevel.py: grouseticks_olre 5 -> 4 rounds, none longer)?  A full step
        is Newton's or another model's taken whole (no trust radius: in log scale, in Σ's entries, onto a
        boundary), which near the optimum contracts as Newton's does.  Counting those too, the GLMM splits of
        parity_multilevel.py (25 cases, one site per top-level unit and 3 sites) went 153 -> 150 and
        138 -> 137 rounds: mmmec_la and _olre 6 -> 5, sim_doctors_la 6 -> 5, sim_rare_la over 3 sites 5 -> 4
        (a step in log scale left 1.9e-3 from 0.34, the final candidate then 9.2e-8), none longer; the
        golden file's and stress_methods.py's rounds the same."""
        if not (self.predict_final and self._accepted_full() and dec < self.config.near_model
                and 0 < d0 < np.inf and dec < d0):
            return False
        nxt, tol = dec ** 3 / d0 ** 2, self.config.tol
        # (not where a final round may take more rounds to settle an approximate value, ``uncertain``: levels
        # shared by sites, where 3 of benchmarks/stress_shared.py's 60 fits took one round more)
        return nxt < tol or self.uncertain is None and nxt < 10.0 * tol and nxt ** 3 / dec ** 2 < tol ** 2

    def _ratio(self, cand: _Candidate, f: float, final: bool) -> float:
        """Actual over predicted decrease of the step to a point of value ``f``.  A final candidate that is
        the current point to within the rounding of the objective (1e-12 relative) counts as a full success:
        it ends the iteration there, with the sums the final round brought."""
        noise = 1e-12 * max(1.0, abs(self._cur.f))
        if final and cand.pred <= noise and f <= self._cur.f + noise:
            return 1.0
        return (self._cur.f - f) / cand.pred if cand.pred > 0 else -np.inf

    def _contracted(self, dec: float) -> bool:
        """Whether the final candidate, reached by a full step from a point with decrement d₀ in the
        quadratic regime, has a decrement d (< 10·tol) whose observed contraction c = d/d₀² predicts a
        decrement c·d² < tol² after its own Newton step: what d < tol promises when c ≤ 1."""
        d0 = self._dec_prev
        if not (dec < 10.0 * self.config.tol and d0 < self.config.near_model and d0 > 0):
            return False
        return dec ** 3 / d0 ** 2 < self.config.tol ** 2

    def _finish(self, converged: bool, last: np.ndarray | None = None):    # last: _final_step's, if made
        self.point = self._cur.x if self._cur is not None else self.x0
        step = _newton_step(self._cur.g, self._cur.H) if converged else None
        if step is not None:
            model = self._model_last(step)
            step = model if model is not None else last if last is not None else self._final_step(step)
            # (a variance exactly at zero stays there: F is even in it, its gradient there 0, and Newton's step
            # leaves it; the models along the last move do not know that -- grouseticks_nested's SD went to 3e-10
            # and its standard errors moved by 6e-6)
            step = np.where(np.isin(np.arange(len(step)), self.boundary) & (self.point == 0.0), 0.0, step)
        self.solution = self.point + (step if step is not None else 0.0)
        self.converged = converged
        if converged and not self.message:
            self.message = "converged"
        return None

    def _ends(self, cur, newton, dec: float) -> bool:
        """After an accepted final round: whether the iteration ends there by the last step to third order
        (:meth:`_third_last`; below tol too, where the round brought the third derivatives), or, from a decrement
        of at least tol, by the contraction a Newton final candidate shows (:meth:`_contracted`; only if it was
        one: it predicts the next Newton step's).  The caller ends it below tol in any case."""
        return self._third_last(cur, newton, dec) \
            or bool(self._cands) and self._cands[0].newton and self._contracted(dec)

    def _third_last(self, cur, newton, dec: float) -> bool:
        """With F's third derivatives T at the final point (``final_third``, the sites' sums), a decrement d below
        THIRD_LAST (below tol too; THIRD_LAST_DEAR with several grouping factors), F's fourth derivatives times d
        and the last step's share off the sites' direction below QUARTIC (one grouping factor; :meth:`_quartic`:
        the information moved to the estimate misses about a quarter of that, relative -- THIRD_LAST
        was 5e-7 alone, where standard errors came out up to 8.2e-9 from the iterative fit's on
        benchmarks/rounds_heldout.py's fits; with the steps in the SDs' squares, and no QUARTIC, stress_methods.py's
        fit 60 ended from 7.8e-8 with that product 0.014 and its standard errors 5.3e-5 off; observed errors 0.04 to
        0.6 times the product) and no zero variance in question: the last step to third order, s solving
        g + Hs + ½T[s, s] = 0 (fixed-point iteration from Newton's), and Chebyshev's s_N − ½H⁻¹T[s_N, s_N] beside
        it (in θ or the SDs' squares: :func:`~fedglmm.likelihood.third_steps.third_steps`).  Where the two agree to
        within tol/10 in the norm of H, each leaves an error of third order in the step (below 1e-9 on the held-out
        fits over 10-20 sites, from decrements of 1e-7 to 1e-6, where Newton's left 1e-8 to 4e-7) and the first ends
        the fit (kept for :meth:`_stop_or_settle`): no round to settle the last step.  T moves the information to the
        estimate whatever the last step (``third_used``; :func:`~fedglmm.likelihood.last_step.information_at_estimate`):
        where the two disagree and the fit ends by Newton's or the caller's model's step, the secant of the step before
        left standard errors 2e-8 off the fit continued to machine precision (sim_toenail_la over 5 sites of unequal
        size, from 7.7e-9)."""
        T, self.final_third, self._third_step = self.final_third, None, None
        T = even_third(cur.x, T, self.boundary) if T is not None else None
        self.third_used = T if T is not None else self.third_used
        self.third_here = T is not None         # (third_used is the final point's: last_step._second_order)
        self._kept_third = (cur, T) if T is not None else None      # (for _third_final, where it goes on)
        if T is None or newton is None or not dec < (THIRD_LAST_DEAR if self.third_dear else THIRD_LAST) \
                or boundary_last(cur.x, cur.g, cur.H, newton, self.boundary, self.config.tol) is not None:
            return False
        steps = third_steps(cur.x, cur.g, cur.H, T, newton, self._squared)
        if steps is None or not steps.land <= 0.01 * self.config.tol ** 2:
            return False
        if not self.third_dear:
            c, share = self._quartic(cur, T, steps.s)
            if not c * dec <= QUARTIC or dec >= THIRD_LAST_OFF and not share <= OFF_SHARE:
                return False
        self._third_step, self.third_used = steps.s, T
        return True

    @property
    def _squared(self) -> tuple:
        """The SDs whose squares the steps to third order may be taken in (:mod:`.third_steps`); none with levels
        shared by sites (``bare_settle``), whose own levels' conditional SDs come at the final round's v: a fit that
        ended sooner left v's last step in them (cbpp_olre's iterative fit, every herd at 3 sites: 3.1e-8 off)."""
        return () if self.third_dear and np.isfinite(self.config.bare_settle) else self.boundary

    def _quartic(self, cur, T: np.ndarray, s: np.ndarray) -> tuple:
        """(c, share): F's fourth derivatives Q relative to H -- the largest |eigenvalue| of H^(-1/2) ½Q[u, u]
        H^(-1/2) over uᵀHu, along the last move u = d from the point before (``previous``; ½Q[d, d] = H(x − d) − H
        + T[d], Taylor from here) and along the sites' direction u = v (``final_quartic``) -- times the share of the
        last step s (in the norm of H) off v where the sites sent Q[v, v], along which the information moves to the
        estimate with it (:func:`~fedglmm.likelihood.last_step._second_order`); and s's share off u (v, else d).
        The information so moved misses about c times the decrement d_f, relative: above QUARTIC the last step is a
        round (:meth:`_third_last`).  (Not the share off d: ½Q[d, d] from Hessians a long move apart is rougher --
        sim_rare_gh20 over 5 sites, the last step at cosine 0.92 with d, standard errors 1.1e-8 off so.)"""
        H, out, share = cur.H, [], 1.0
        off = lambda u: 1.0 - float(s @ H @ u) ** 2 / (float(u @ H @ u) * float(s @ H @ s))    # noqa: E731
        try:
            w, V = np.linalg.eigh(H)
            half = V / np.sqrt(w)
            scale = lambda M, uu: float(np.max(np.abs(np.linalg.eigvalsh(half.T @ M @ half)))) / uu   # noqa: E731
            d, half_q = quartic_along_move(self.previous, cur.x, H, T)
            if d is not None and float(d @ H @ d) > 0:
                out.append(scale(half_q, float(d @ H @ d)))
                share = off(d)
            if self.final_quartic is not None:
                v, Q = self.final_quartic
                out.append(scale(0.5 * Q, float(v @ H @ v)))
                share = off(v)
        except (np.linalg.LinAlgError, FloatingPointError, ValueError, ZeroDivisionError):
            return np.inf, 1.0
        return max(out, default=0.0) * (share if self.final_quartic is not None else 1.0), share

    def _stop_or_settle(self, cur, newton):
        """Finish, unless the last step is not yet known to the tolerance: the models of F here (Newton, to
        third order or in Σ's entries: :func:`last_step`; the caller's, :meth:`_model_last`, held against
        both) disagree on it by more than tol² in the norm of H (cf. :meth:`_contracted`), or the model in
        a zero SD's square promises more (:func:`boundary_last`).  That step is then one more final round."""
        if self._third_step is not None:         # (the last step to third order: see _third_last)
            self.point, self.solution, self.converged = cur.x, cur.x + self._third_step, True
            self.message, self._third_step = self.message or "converged", None
            return None
        if newton is not None and not self._settling:
            model, third = self._model_last(newton), self._final_step(newton)
            last = third if model is None else model
            miss = min((last - other for other in ((newton,) if model is None else (newton, third))),
                       key=lambda m: m @ cur.H @ m)
            edge = boundary_last(cur.x, cur.g, cur.H, newton, self.boundary, self.config.tol)
            bare = not self.third_here and last @ cur.H @ last > self.config.bare_settle ** 2
            if edge is not None or bare or min(miss @ cur.H @ miss, last @ cur.H @ last) > self.config.tol ** 2:
                self._settling = True
                last, pred = (last, -(cur.g @ last)) if edge is None else edge
                out = self._final(cur, last, pred, None, None)
                self._cands[0].settle = True
                return out
            return self._finish(converged=True, last=third)
        return self._finish(converged=True)

    def _model_last(self, step: np.ndarray) -> np.ndarray | None:
        """The caller's model's last step: it carries the higher-order terms, so it is kept where it agrees
        with Newton's to within the Newton step's own size (and the Newton step is not already exact)."""
        if self.model is None or not self._model_ok \
                or not 1e-3 * self.config.tol ** 2 < -(self._cur.g @ step) < 10.0 * self.config.tol:
            return None
        # (asked again at the finish: the model's local solve then goes on from where the first one ended)
        extra = self._model_step(self._cur, final=True)
        d = np.sqrt(np.abs(np.diag(self._cur.H)))
        if extra is not None and np.linalg.norm(d * (extra.step - step)) <= np.linalg.norm(d * step):
            return extra.step
        return None

    def _final_step(self, step: np.ndarray) -> np.ndarray:
        return last_step(self._cur, self.previous, self.covariance, step)

