"""The rounds of a binomial or poisson fit whose grouping factors have levels at several sites (Laplace):
the evaluator that the trust-region Newton iteration of :func:`fedglmm.likelihood.fit.fit_glmm` drives in
φ = (β, θ), while the shared effects v follow by Newton steps of their own, warm-started across rounds.

For each φ the iteration asks for, one round carries 1 + 2P points x = (v, φ) (P = dim φ): the point
(v̄, φ), v̄ the prediction from the nearest point evaluated before (its v plus its Newton step δv plus its
tangent τ times the change of φ, plus half the change of τ, known from that point's differences), and
(v̄ ± h_j τ̄_j, φ ± h_j e_j).  The sites evaluate every point
(:class:`~fedglmm.likelihood.glmm_shared.SharedGLMMSums`) with the coordinator's prediction Γ̂ of
Λ C⁻¹ Λᵀ there; from their totals :class:`~fedglmm.likelihood.glmm_shared_pool.SharedGLMMPool` gives the
Laplace log-likelihood and its gradient at each point, the central differences of the totals S the
derivatives of log det C with the exact Γ (at the difference points: what Γ̂ missed, to first order),
and the central differences of the gradients the Hessian.  The same differences move the gradient's
log-determinant part from v to v's mode (:func:`~.shared_ends.log_det_to_mode`).  The value, gradient and Hessian
are those of ℓ(φ) at the joint mode to first order in δv.  A trial φ whose δv is not small (the start; a long
step) takes further rounds (:meth:`SharedGLMMEvaluator._solve`); otherwise the rounds are those of the
Newton iteration.  At the estimate the final round is repeated, with v moved by δv, until v's Newton
decrement is below ``FINAL_DEC``: its value and gradient are then those at the joint mode.  A final round
also gives ℓ's third derivatives from its points (:mod:`.shared_third`), used where it predicted τ and Γ̂ well:
the last step is then to third order and moves the Hessian too; elsewhere a last step longer than 1e-7 in
the Hessian's norm has a final round of its own (``bare_final``: likelihood.fit).

The final round also returns each site's local modes given the shared ones (and their SDs, adding the
shared part RΓRᵀ); the coordinator reports the shared levels' modes, b̂_v = Λ v̂ with SDs from Λ C⁻¹ Λᵀ.
"""
from __future__ import annotations

import numpy as np

from ..likelihood.glmm_shared import GLMM_SHARED_KEYS, to_global
from ..likelihood.glmm_shared_pool import SharedGLMMPool, SharedPoint
from ..likelihood.setup import Setup, sum_replies
from ..likelihood.shared import SharedLayout, by_factor
from .shared_rounds import POOLED, local_moves
from .shared_ends import bracketed, differences, gradient_settled, log_det_to_mode, modes_to_v, settled
from .shared_third import close, tangent_fix, third, triple_points, trusted

WARM, MAX_WARM = 0.5, 8      # rounds for one φ while v's Newton decrement is above WARM (see _solve)
LOOSE, FAR = 2.0, 3.0        # ... above LOOSE while the iteration's own decrement is above FAR (see _solve)
START = 0.05                 # ... the start's v, whose φ-gradient and Hessian every later round builds on
MAX_START = 24               # ... for the start, which has no other point to fall back on
LINE = (0.5, 0.25, 0.125)    # the fractions of v's Newton step also tried in those rounds
GRID = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)   # the shared levels' intercepts tried in a first round (see _grid)
MIN_GRID_SD = 1e-3           # ... where their SD exceeds this
CAP = 2.0                    # largest move of a shared effect by one Newton step of v (linear predictor scale)
GIVE_UP = 100.0              # a trial φ (not the start) whose v has a larger decrement is not pursued
FINAL_DEC = 1e-8             # v's Newton decrement at the estimate below which its value is exact ...
FINAL_VALUE = 3e-10          # ... and the bound on the value's error from Γ̂ there (see shared_ends.settled)
FINAL_GRAD = 1e-14           # ... and on the last step's error from Γ̂ in the gradient (shared_ends.gradient_settled)
STEP = 1e-5          # central differences along (τ̄_j, e_j): h_j = STEP (1 + |φ_j|) -- their O(h²) error was
                     # the standard errors' once the last step was settled: 1.7e-7 at 1e-4 (stress_shared.py's
                     # fit 39; 1.5e-8 at 3e-5), 1.2e-8 at 1e-5, every fit in the same rounds
TANGENT = 0.5        # the gradient is moved to v's mode where the predicted tangent τ̄ is within this of τ


class SharedGLMMEvaluator:
    """The evaluator of a GLMM with shared levels over ``rounds`` (a
    :class:`~fedglmm.coordinator.rounds.RoundEvaluator` built with :meth:`total`)."""

    modes = None        # (the pseudo-data fit's modes and conditional SDs by factor: see __init__)
    iteration_decrement = np.inf    # the Newton decrement of the iteration's current point (likelihood.fit sets it)
    bare_final = True   # a final round without third derivatives (likelihood.fit.BARE_SETTLE; see shared_third)

    def __init__(self, setup: Setup, rounds=None, settle: float = WARM, patient: bool = False,
                 modes: tuple | None = None):
        """``settle``: the decrement of v below which a point's value counts (WARM in a fit; a point of a
        profile, whose every value counts, is settled much further); ``patient``: every point is
        settled, none given up for another (a profile); ``modes``: (modes, conditional SDs) of the shared
        levels to start v from (:func:`~fedglmm.coordinator.shared_ends.modes_to_v`), or None (v = 0 and
        :meth:`_grid`)."""
        self.rounds, self.settle, self.patient = rounds, settle, patient
        self.modes, self.zs = modes, setup.zs
        zcols = setup.factor_columns()
        self.layout = SharedLayout.from_payload({f: list(lv) for f, lv in setup.shared.items()},
                                                {f: len(c) for f, c in zcols.items()})
        self.pool = SharedGLMMPool(self.layout, setup.mask, zcols, len(setup.names))
        self.zcols = zcols
        self.seen: list[SharedPoint] = []

    def total(self, replies: dict, keys) -> dict:
        """The sites' sums added up in the global layout."""
        Q = self.layout.Q
        return sum_replies({sid: to_global(r, Q) for sid, r in replies.items()}, keys)

    # --- the points of one φ ----------------------------------------------------------------------
    def _nearest(self, phi) -> SharedPoint | None:
        if not self.seen:
            return None
        return min(reversed(self.seen), key=lambda s: float(np.sum((s.phi - phi) ** 2)))

    def _plan(self, phi, v=None, hint=None, near: SharedPoint | None = None, final: bool = False) -> dict:
        """The points (v, φ) for one φ -- v predicted from the nearest point evaluated unless given --
        the prediction Γ̂ at each, and the difference steps; with ``near`` at the same φ, also the points
        with v moved by the fractions LINE of the step from ``near`` (the line search of :meth:`_solve`);
        ``final``: a final round's, with the mixed points of the third derivatives where ``near`` is close to φ
        (:func:`.shared_third.triple_points`, :func:`.shared_third.close`)."""
        phi = np.asarray(phi, float)
        P, Q = len(phi), self.layout.Q
        near = self._nearest(phi) if near is None else near
        L = self.pool.L(phi[self.pool.p:])
        if v is None and near is None and self.modes:
            # the pseudo-data fit's modes, and their conditional SDs for Γ̂ = Var(b | y): C = ΛᵀΓ̂⁻¹Λ
            v, var = modes_to_v(self.layout, self.zcols, self.zs, L, *self.modes)
            hint = (L.T @ (L / var[:, None]), np.zeros((Q, P))) if var is not None else hint
        if v is None:
            v = near.v_at(phi) if near is not None else np.zeros(Q)
        taubar = hint[1] if hint is not None else np.zeros((Q, P)) if near is None else near.tau_at(phi)
        h = STEP * (1.0 + np.abs(phi))
        xs = [(v, phi)]
        for j in range(P):
            for sign in (1.0, -1.0):
                e = np.zeros(P)
                e[j] = sign * h[j]
                xs.append((v + sign * h[j] * taubar[:, j], phi + e))
        third = final and (P < 3 or near is not None and close(near.phi, phi))
        xs += triple_points(phi, v, h, taubar) if third else []
        if near is None:
            line = self._grid(phi) if not self.modes else []
        else:
            line = [(near.v + t * (v - near.v), phi) for t in LINE] if np.array_equal(near.phi, phi) else []
        if hint is not None:
            # C and τ predicted at v (shared_ends): S with I + ΛᵀSΛ = C at every point of the plan
            S0 = np.linalg.lstsq(L.T, np.linalg.lstsq(L.T, (hint[0] - np.eye(Q)).T, rcond=None)[0].T, rcond=None)[0]
            S = [S0] * len(xs + line)
        else:
            S = [np.zeros((Q, Q)) if near is None else near.S_at(x[1]) for x in xs + line]
        gammas = [self.pool.gamma(x[1], s) for x, s in zip(xs + line, S)]
        psis = [self.pool.psi(x[1], x[0]) for x in xs + line]
        return {"phi": phi, "xs": xs, "line": line, "gammas": gammas, "psis": psis, "h": h, "taubar": taubar,
                "near": near is not None, "final": final, "third": third}

    def _grid(self, phi) -> list:
        """The points of a first round beside v = 0 (nothing evaluated yet) with one grouping factor: every
        level's first effect (its intercept, mostly) at GRID on the scale of the linear predictor (v's first
        entry c / Λ₁₁, the others 0: the rest of b follows Λ's first column).  Each level then goes on from
        the one nearest its mode (:meth:`_step`): Newton's steps from 0, capped, took 2-6 rounds to reach the
        modes where they lie a few units out (a poisson model without intercept, or an SD of 1.5).  Not beside
        other factors: a factor crossing it couples the levels, which then go on together, and the grid's
        points only cost the sites (7 crossed held-out cases: the same rounds, 5-9 % more bytes)."""
        idx = self._level_columns()
        if idx is None or len(self.pool.zcols) != 1:
            return []
        block = self.pool.L(phi[self.pool.p:])[np.ix_(idx[0], idx[0])]
        if not abs(block[0, 0]) > MIN_GRID_SD:
            return []
        out = []
        for c in GRID:
            v = np.zeros(self.layout.Q)
            v[idx[:, 0]] = c / block[0, 0]
            out.append((v, phi))
        return out

    def _step(self, pt: SharedPoint, tried=(), grid: bool = False) -> tuple:
        """v moved by its Newton step, shortened so that no shared effect b = Λv moves by more than CAP
        on the scale of the linear predictor (Newton's step for a logit or log link overshoots from far).
        Where v's levels do not interact (one factor, C block-diagonal by level: F is then a sum over the
        levels), level by level: each level goes on from the point of ``pt`` and ``tried`` (the round's
        other points at the same φ) where its own Newton decrement is least, by its own step capped alone
        -- not all levels held back by the one that moves most, nor all sent back by one that overshot.
        Returns (v, None or (C, τ) predicted there): a level with a bracket of the first round's grid goes to
        its root instead (:func:`~fedglmm.coordinator.shared_ends.bracketed`)."""
        L = self.pool.L(pt.phi[self.pool.p:])
        blocks = self._blocks(pt)
        if blocks is None:
            db = np.abs(L @ pt.dv)
            big = float(np.max(db, initial=0.0))
            return pt.v + pt.dv * (min(1.0, CAP / big) if big > 0 else 1.0), None
        pts = [pt] + [t for t in tried if t.C is not None and np.all(np.isfinite(t.dv))]
        dv = np.stack([t.dv[blocks] for t in pts])                                  # (K, levels, q)
        dec = np.einsum("klq,klqr,klr->kl", dv, np.stack([t.C[blocks[:, :, None], blocks[:, None, :]]
                                                          for t in pts]), dv)
        pick = np.argmin(np.where(np.isfinite(dec), dec, np.inf), axis=0)
        at = np.arange(blocks.shape[0])
        step, v = np.zeros(self.layout.Q), np.empty(self.layout.Q)
        step[blocks] = dv[pick, at]
        v[blocks] = np.stack([t.v[blocks] for t in pts])[pick, at]
        big = np.abs(L @ step)[blocks].max(axis=1)
        scale = np.where(big > CAP, CAP / np.where(big > 0, big, 1.0), 1.0)
        out = v + step * np.repeat(scale, blocks.shape[1])
        root = bracketed(pts, blocks) if grid else None      # (the start's rounds: the first one's grid)
        if root is None:
            return out, None
        at, vs, Cs, taus = root
        out[blocks[at]] = vs
        C, tau = pt.C.copy(), pt.tau_at(pt.phi).copy()
        C[blocks[at][:, :, None], blocks[at][:, None, :]] = Cs
        tau[blocks[at]] = taus
        return out, (C, tau)

    def _level_columns(self):
        """With one shared factor, the positions in v of each of its levels' effects (levels × q), else None."""
        if len(self.layout.factors) != 1:
            return None
        f = self.layout.factors[0]
        return self.layout.columns(f, np.arange(len(self.layout.levels[f])))

    def _blocks(self, pt: SharedPoint):
        """The positions in v of each shared level's effects (levels × q) where F is a sum over the levels
        (one factor, and C has no entry between two levels), else None."""
        idx = self._level_columns()
        if idx is None or pt.C is None:
            return None
        off = np.abs(pt.C).copy()
        off[idx[:, :, None], idx[:, None, :]] = 0.0
        return idx if not np.any(off) else None

    def _digest(self, plan: dict, totals: list):
        """The profile at the plan's point from its totals (and those of its difference points), its line
        points (those with a finite F), and the result for the iteration (NaN where it failed)."""
        pool, P = self.pool, len(plan["phi"])
        Q = self.layout.Q
        nan = {"value": np.nan, "grad": np.full(P, np.nan), "hess": np.full((P, P), np.nan)}
        m = len(plan["xs"])
        line = []
        with np.errstate(all="ignore"):
            for t, x in zip(totals[m:], plan["line"]):
                try:
                    line.append(pool.assess(t, x[1], x[0]))
                except (np.linalg.LinAlgError, ValueError):
                    pass
            line = [pt for pt in line if np.isfinite(pt.F)]
            try:
                Smat = [-np.asarray(t["Hh"], float)[:Q, :Q] for t in totals[:m]]
                fd = (Smat[1::2][:P], Smat[2::2][:P], plan["h"], plan["taubar"])
                base = pool.assess(totals[0], plan["phi"], plan["xs"][0][0], fd)
                others = [pool.assess(t, x[1], x[0], near=(g, base.dS))
                          for t, x, g in zip(totals[1:m], plan["xs"][1:], plan["gammas"][1:m])]
                diffs = differences(others, plan["h"])
                T = third(pool.assess(totals[0], plan["phi"], plan["xs"][0][0], near=(plan["gammas"][0], base.dS)),
                          others, diffs, plan["h"]) if plan["third"] else None
            except (np.linalg.LinAlgError, ValueError):
                return None, line, nan
        if plan["near"] and np.abs(base.tau - plan["taubar"]).max() <= TANGENT * np.abs(base.tau).max():
            base.grad = base.grad - 0.5 * log_det_to_mode(base, diffs)
        H = np.empty((P, P))
        for j in range(P):
            H[:, j] = (others[2 * j].grad - others[2 * j + 1].grad) / (2.0 * plan["h"][j])
        base.dtau = np.stack([(others[2 * j].tau - others[2 * j + 1].tau) / (2.0 * plan["h"][j]) for j in range(P)])
        H = 0.5 * (H + H.T) + (tangent_fix(base, diffs, plan["taubar"]) if plan["final"] else 0.0)
        ok = np.isfinite(base.value) and np.isfinite(base.F) and np.all(np.isfinite(base.grad)) \
            and np.all(np.isfinite(H))
        if not ok:
            return None, line, nan
        use = T is not None and trusted(base, plan["taubar"], plan["gammas"][0])
        return base, line, {"value": base.value, "grad": base.grad, "hess": H, **({"third": -T} if use else {})}

    def _solve(self, points) -> list:
        """One round for the given φs, and more while the v of some φ is not yet close to its mode (a
        Newton decrement F_v·δv above :meth:`_settle`'s, where the first-order corrections for δv are too rough to
        compare values: from far away at the start, or after a long step).  Each further round moves that
        φ's v by its Newton step δv, and also tries v moved by the fractions LINE of it (a line search
        within the round: a full Newton step from far away overshoots for the log and logit links),
        going on from the best F (steps capped by :meth:`_step`).  Once some φ of the call is settled (one
        round later for the starts, so that each gets its v settled: 414 rounds against 443 on
        benchmarks/stress_shared.py's 60 fits, 423 against 475 on its --seed 100 ones), or
        after MAX_WARM rounds (MAX_START for the start: a poisson model without intercept whose levels' means
        reach e^5.7, from the site totals' start, took 10; it had no finite value after 8, and the fit
        stopped), the others get NaN, and so does at once a trial φ (not the start) whose
        decrement is above GIVE_UP: a trial point whose v is far from its mode is a long step, and the
        iteration then steps shorter."""
        first = not self.seen
        plans = {i: self._plan(x) for i, x in enumerate(points)}
        P = len(np.asarray(points[0]))
        out = {i: {"value": np.nan, "grad": np.full(P, np.nan), "hess": np.full((P, P), np.nan)}
               for i in plans}
        grace = False
        for _ in range(MAX_START if first else MAX_WARM):
            order = list(plans)
            psis = [p for i in order for p in plans[i]["psis"]]
            gammas = [g for i in order for g in plans[i]["gammas"]]
            totals = self.rounds.evaluate(psis, GLMM_SHARED_KEYS, {"gammas": np.asarray(gammas)})
            at = 0
            for i in order:
                pl = plans.pop(i)
                m = len(pl["psis"])
                base, line, res = self._digest(pl, totals[at: at + m])
                at += m
                if base is not None and base.decrement < (min(self.settle, START) if first else self._settle()):
                    # settled: a line point of the round cannot beat v's mode but by rounding
                    self.seen.append(base)
                    out[i] = res
                    continue
                start = _start(base, line)
                if start is not None and self.seen and not self.patient and start.decrement > GIVE_UP:
                    continue             # far from any v known: a long step (NaN: the iteration steps shorter)
                if start is not None:
                    plans[i] = self._plan(pl["phi"], *self._step(start, _others(start, base, line), first), start)
            done = any(np.isfinite(r["value"]) for r in out.values())
            # (the starts: once one is settled, the others have one more round -- they settle in about as
            # many -- for the iteration goes on from the lowest of them)
            if not plans or not self.patient and done and (grace or not first):
                break
            grace = done
        return [out[i] for i in range(len(points))]

    def _settle(self) -> float:
        """The decrement of v below which a trial point's value, gradient and Hessian count: LOOSE while the
        iteration is far from its estimate (its decrement above FAR), where an error of the second order in δv
        is small against the step's gain and the round that would settle v further is saved (the held-out
        verbagg_dif over 4 sites 10 -> 8 rounds, sim_items_pois_slope over 6 sites 12 -> 10), else WARM: nearer,
        sim_items_pois_slope over 3 sites took a trial point 0.009 above the optimum at a decrement of 0.7, its
        value 1.8e-3 too high, and every step from it failed (8 -> 10 rounds with LOOSE throughout)."""
        far = not self.patient and self.iteration_decrement > FAR
        return max(self.settle, LOOSE) if far else self.settle

    def evaluate(self, points, keys):
        return self._solve(points)

    def uncertain(self, phi) -> bool:
        """Whether the value at ``phi`` came from a v not yet at its mode (a decrement above FINAL_DEC): it is
        then right to first order in δv only, and evaluating ``phi`` again (v moved by δv) gives it to the
        last digits.  The Newton iteration asks this when a round's steps all fail: a value at a point whose
        v was off could be too high (a poisson model without intercept over 3 sites, every level shared: ℓ
        2.6e-4 too high at a v decrement of 7e-3), and no step could then beat it."""
        phi = np.asarray(phi, float)
        last = next((s for s in reversed(self.seen) if np.array_equal(s.phi, phi)), None)
        return last is not None and last.decrement > FINAL_DEC

    def finalize(self, point, keys, extra=None):
        """The final round at ``point`` (its difference points too: the Hessian gives the standard errors),
        with each site's local modes; again with v moved by its Newton step until the value is that at the
        joint mode (:func:`~fedglmm.coordinator.shared_ends.settled`; the gradient is then exact too)."""
        plan = self._plan(point, final=True)
        for _ in range(MAX_WARM):
            extra = dict(extra or {})
            extra.update({"points": np.asarray(plan["psis"]), "gammas": np.asarray(plan["gammas"]),
                          "shared_G": plan["gammas"][0]})
            _, rep = self.rounds.finalize(plan["psis"][0], (), extra)
            m = len(plan["psis"])
            totals = [self.total({sid: r["points"][i] for sid, r in rep.items()}, GLMM_SHARED_KEYS)
                      for i in range(m)]
            base, line, s = self._digest(plan, totals)
            if base is not None and settled(base, plan["gammas"][0], FINAL_DEC, FINAL_VALUE) \
                    and gradient_settled(base, plan["taubar"], plan["gammas"][0], s["hess"], FINAL_GRAD):
                break
            start = _start(base, line)
            if start is None:
                break
            plan = self._plan(point, *self._step(start, _others(start, base, line)), start, final=True)
        parts = {sid: {k: v for k, v in r.items() if k not in GLMM_SHARED_KEYS + ("points", "scols")}
                 for sid, r in rep.items()}
        if base is not None:
            self.seen.append(base)
            db, D = self._moves(base)
            parts[POOLED] = self._shared_modes(base, D)
            # a site's local modes, in its own (shared columns of b, β, θ): moved to v's joint mode at φ
            # (Λ δv) and chained through b's derivatives (cbpp_olre over 3 sites: 4e-5 off the pooled fit)
            local_moves(parts, 0, db, D)
        return s, parts

    def _moves(self, pt: SharedPoint) -> tuple[np.ndarray, np.ndarray]:
        """How the shared effects b = Λv move from the point sent to the estimate: to v's mode at φ, Λ δv,
        and then in φ, D = Λ τ (v̂ follows its tangent) plus, for θ_t, (∂Λ/∂θ_t) v̂ (Λ is linear in θ)."""
        p = self.pool.p
        theta = pt.phi[p:]
        L, v = self.pool.L(theta), pt.v + pt.dv
        D = L @ pt.tau
        zero = self.pool.L(np.zeros_like(theta))
        for t in range(len(theta)):
            D[:, p + t] += (self.pool.L(np.eye(len(theta))[t]) - zero) @ v
        return L @ pt.dv, D

    def _shared_modes(self, pt: SharedPoint, D: np.ndarray) -> dict:
        """The shared levels' modes b̂_v = Λ v̂ and SDs sqrt(diag Λ C⁻¹ Λᵀ), by factor (internal scale), and
        the modes' derivatives in φ (``dmodes``: ``D``, :meth:`_moves`), with which they move to the estimate
        as the sites' do (without them the shared levels' modes of sim_items_pois over 3 sites differed
        between methods by 3.9e-6)."""
        L = self.pool.L(pt.phi[self.pool.p:])
        sd = np.sqrt(np.maximum(np.diag(pt.Gamma), 0.0))
        out = by_factor(self.layout, self.zcols, L @ (pt.v + pt.dv), sd)
        out["dmodes"] = by_factor(self.layout, self.zcols, D, D)["modes"]
        if pt.dS is not None:
            # the SDs' too: Γ = Λ C⁻¹ Λᵀ with S along its derivatives ∂S (verbagg_dif over 3 sites: 5.3e-6)
            dsd = np.zeros_like(D)
            for j in range(len(pt.phi)):
                h = 1e-5 * (1.0 + abs(pt.phi[j]))
                e = np.eye(len(pt.phi))[j] * h
                gp, gm = (self.pool.gamma(pt.phi + a * e, pt.S + a * h * pt.dS[j]) for a in (1.0, -1.0))
                dsd[:, j] = np.where(sd > 0, (np.diag(gp) - np.diag(gm)) / (4.0 * h * np.where(sd > 0, sd, 1.0)), 0.0)
            out["dcondsd"] = by_factor(self.layout, self.zcols, dsd, dsd)["modes"]
        return out


def _start(base: SharedPoint | None, line: list) -> SharedPoint | None:
    """The point of a round that the next goes on from: the highest F of the plan's point and its line points."""
    best = max(line, key=lambda pt: pt.F, default=None)
    return base if base is not None and (best is None or base.F >= best.F) else best


def _others(start: SharedPoint, base: SharedPoint | None, line: list) -> list:
    """The round's points at the same φ other than ``start``."""
    return [pt for pt in ([base] if base is not None else []) + line if pt is not start]

