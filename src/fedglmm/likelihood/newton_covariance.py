"""The candidates of the coordinator's Newton iteration (:class:`~fedglmm.likelihood.newton.TrustRegionNewton`,
which takes these methods from :class:`CovarianceMoves`) that move the random-effect covariance otherwise than
Newton's step in θ does: the step in Σ's entries (:mod:`~fedglmm.likelihood.covariance_steps`), where Newton in θ
may fall short near a singular Σ, and the turns of a row of Λ off a saddle on a face of Σ."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .candidates import Candidate as _Candidate, unbounded as _unbounded
from .covariance_steps import TURNS
from .last_step import covariance_step

NEARLY_SINGULAR = 0.3   # a row of Λ whose diagonal entry is less than this share of its norm: Σ nearly singular
SADDLE = 1e-9           # |F| times this: the least curvature down along a turn off a face that H ignores, and
                        # at least what takes the smallest turn's gain above the Newton decrement (_turns)
SIGMA_FINAL = 0.01      # near the optimum, the final candidate is the step in Σ's entries where the model there
                        # predicts the gradient at the point before with a miss below this share of θ's model's


class CovarianceMoves:
    """The covariance candidates of :class:`~fedglmm.likelihood.newton.TrustRegionNewton` (a mixin: the state
    they read and set is the iteration's)."""

    def _in_covariance(self, cur, newton, linear: bool, onto_zero: bool = False) -> _Candidate | None:
        """The Newton step in the covariance's entries (``covariance``: see
        :mod:`~fedglmm.likelihood.covariance_steps`) as one more candidate, where the Newton step in θ may
        fall short: it converged only linearly (``linear``), or shrinks a diagonal entry of Λ by a quarter
        (a variance heading to 0), or by 5 % where that entry is under half its row's norm (Σ nearly
        singular, where Newton in θ crawls along a curved valley), or the step accepted last was one in Σ's
        entries or a turn off a saddle and the decrement is still above ``near`` (the valley goes on: after
        the turn, stress_methods seed 3 fit 0 took 6 more Newton rounds along it, now 2), or, with the
        decrement above ``near``, a share is under ``NEARLY_SINGULAR`` but not 0 (an intercept SD of 0.01 by
        a slope's 0.5 left the correlation to crawl along a ridge: stress_methods seed 11 fit 80, 39 rounds,
        now 6; at an exact zero the boundary's steps serve).

        Below ``near`` a variance the Newton step shrinks by more than half (``onto_zero``: the boundary's
        step is the final candidate) asks for no such round of several points -- by a quarter to a half, it
        still does (a variance going to 0 linearly: the singular slope of an LMM over 7 sites took 16
        rounds instead of 9 without it) --; and where the Newton step there grows a small standard deviation
        by half or more (θ's quadratic model is poor near 0, the model in Σ's entries is not), the final
        candidate is the step in Σ's entries (:meth:`_final_edge`).  benchmarks/small_slope_rounds.py
        (slope SDs 0-0.15), seeds 0-99: 457 -> 444 rounds, above 4 in 46 -> 37 of 100.  So it is, also over a
        step to third order, where the model in Σ's entries predicts the gradient at the point before with a miss
        under SIGMA_FINAL times θ's model's (:func:`~fedglmm.likelihood.last_step.covariance_step`): near a
        nearly singular Σ the step to third order left 8e-7 where Σ's would have left 1e-11 (stress_methods seed
        40 fit 20: 7 -> 6 rounds; seed 7 fit 60, Newton's 8e-8 for 2e-13: 6 -> 5)."""
        self._near_cov = None
        cov = self.covariance
        if cov is None:
            return None
        if newton is None:        # H indefinite in θ: the model in Σ's entries may be convex all the same
            return self._cov_candidate(cur)
        diag = cov.diagonal
        t, t1 = np.abs(cur.x[diag]), np.abs(cur.x[diag] + newton[diag])
        share = cov.conditional_share(cur.x)
        shrinks = (t > 1e-8) & ((t1 < 0.75 * t) | ((t1 < 0.95 * t) & (share < 0.5)))
        far = self._dec_prev >= self.config.near
        nearly = far and bool(np.any((share > 1e-8) & (share < NEARLY_SINGULAR)))
        after = self._cov_won and far
        sigma = None if far else covariance_step(cur, self.previous, cov, ratio=SIGMA_FINAL)
        grows = not far and bool(np.any((t > 1e-8) & (t1 > 1.5 * t)))
        wanted = linear or shrinks.any() and (far or not onto_zero) or after or nearly
        step = self._cov_candidate(cur, sigma) if grows or wanted or sigma is not None else None    # (one solve)
        if grows or sigma is not None:
            self._near_cov = (cur, step, sigma is not None)     # (the last: also over a step to third order)
        if wanted and step is not None and self._cov_agrees(cur, step, newton):
            return None
        return step if wanted else None

    def _final_edge(self, cur, edge, tail, third=None) -> _Candidate | None:
        """The final candidate's step where it is not Newton's (or the caller's model's): the step in Σ's
        entries that :meth:`_in_covariance` kept for this point, else the boundary's step, else a negative
        binomial's step to its poisson limit (a final candidate as a zero variance's boundary point is).  Beside
        a step to third order (``third``) only the step in Σ's entries kept as SIGMA_FINAL's, else None."""
        kept, self._near_cov = self._near_cov, None
        if kept is not None and kept[0] is cur and kept[1] is not None and (third is None or kept[2]):
            return kept[1]
        if third is not None:
            return None
        return edge if edge is not None or tail is None or not tail.limit else tail

    def _turns(self, cur, newton, cov) -> list[_Candidate]:
        """At a saddle on a singular Σ: Λ's row turned off it, as further candidates, each accepted where F
        falls (its predicted decrease the quadratic model's, at least 1e-300)
        (:meth:`~fedglmm.likelihood.covariance_steps.CovarianceSteps.turns`).  H indefinite: from the covariance
        step's point if that stays on the face (the reversed factor's step does).  H positive definite and F
        curving down along the row turned all the same (``CovarianceSteps.saddle`` with ``within``), from the
        Newton step's point (which stays on the face), once a point: such a point is no estimate, and the round
        carries no final candidate (stress_methods seed 40 fit 20, the optimum's correlation 0.79 against 1 at
        the saddle: 10 rounds, now 7).  Only where the smallest turn's
        predicted gain exceeds the Newton decrement: further from the face's optimum the gradient's part in that
        curvature is noise of the way there (small_slope_rounds.py by the iterative method, fits whose optimum
        is on the face: 3 took a round more without it)."""
        if self.covariance is None or self.config.single or newton is not None and self._turned is cur:
            return []
        cs = self.covariance
        if newton is not None:
            self._turned = cur
            least = max(SADDLE * max(1.0, abs(cur.f)), -2.0 * (cur.g @ newton) / TURNS[0] ** 2)
            pos = cs.saddle(cur.x, cur.g, cur.H, least, within=1e-4)
            steps = [newton + s for s in cs.turns(cur.x + newton, pos)]
        else:
            base = cur.x + (cov.step if cov is not None else 0.0)
            steps = [base - cur.x + s for s in cs.turns(base, cs.saddle(base, cur.g + cur.H @ (base - cur.x), cur.H))] \
                or cs.turns(cur.x, cs.saddle(cur.x, cur.g, cur.H))
        return [replace(_unbounded(s, max(-(cur.g @ s + 0.5 * s @ cur.H @ s), 1e-300), cur.H), cov=True)
                for s in steps]

    def _cov_candidate(self, cur, st=None) -> _Candidate | None:
        """The step in Σ's entries as a candidate: ``st`` (step, predicted decrease) where already made."""
        st = self.covariance.step_or_reversed(cur.x, cur.g, cur.H) if st is None else st
        if st is None:
            return None
        return replace(_unbounded(*st, cur.H), cov=True)
