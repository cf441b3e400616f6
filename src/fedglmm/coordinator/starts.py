"""The hybrid's starting points at the coordinator: an estimate on the internal scale, and the
combination of the sites' own fits with the pseudo-data (:mod:`fedglmm.coordinator.virtual`).

A site fits its own rows in its own coding (:mod:`fedglmm.site.own_fit`): columns ``names`` of its one-shot
design, ψ.  On its rows the agreed design is X_a = X_F[:, map] (each agreed column is the site's column of
the same name, or zero), and X_S ψ = X_a β for ψ = Lβ with L = (X_SᵀX_S)⁻¹X_SᵀX_a, both from the
cross-products ``XᵀX`` the site sends in the same message.  Its fit is then the quadratic
q_s(x) = ½ (Mx − x̂_s)ᵀ I_s (Mx − x̂_s) in the internal parameters x = (γ, θ̃, and a dispersion), with M
mapping x to the site's (ψ, θ, dispersion) -- singular where the site lacks a level.

The combined start minimises Σ_s q_s(x) + Σ_s R_s(x) + Σ_t P_t(x): R_s is what the site's pseudo-data
(from its groups' moments) have beyond their second-order Taylor expansion at the site's estimate -- the
third and higher derivatives of a likelihood of the same kind, which the quadratics lack -- and P_t the
pseudo-data log-likelihood of the sites that sent no fit of their own.  Without pseudo-data this is the
information-weighted combination of the sites' fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..likelihood.fused import parallel_map
from ..likelihood.linalg import transform_third
from ..likelihood.starts import start_values

ATTENUATE = 1.3           # the factor of the SD variants of a binary start (see attenuated)
ATTENUATION = {"logit": 0.346, "probit": 1.0}   # c of the attenuation factor √(1 + c σ²) per link
TOTALS_SD, TOTALS_CURVE = (2.0, 3.0), 1.0     # the site totals' binary start's variants (see totals_variants)


@dataclass
class OwnPart:
    """A site's own fit on the internal scale: −ℓ_s ≈ ½ xᵀKx − hᵀx + c around ``center`` (a minimiser)."""

    K: np.ndarray
    h: np.ndarray
    center: np.ndarray
    ngroups: float
    T: np.ndarray | None = None      # the third derivatives of −ℓ_s at the centre, when the site sent them

    def quadratic(self, x):
        d = x - self.center
        Kd = self.K @ d
        return 0.5 * d @ Kd, Kd, self.K


def own_part(loc: dict, message: dict, st) -> OwnPart | None:
    """A site's own fit (:func:`fedglmm.site.own_fit.own_fit`; ``message`` is the one-shot message it came
    in) in the agreed coding, on the internal scale; None if it does not fit the model.  A fit coded as
    agreed needs no mapping; another needs the message's ``XᵀX``, which a site under secure aggregation
    does not send (its fit is then left out)."""
    site_names = list(message["x_names"])
    if list(loc.get("z_names", message["z_names"])) != list(st.znames):
        return None
    try:
        names = list(loc.get("names", site_names))
        S = [site_names.index(nm) for nm in names]
        if names == list(st.names):
            L = st.A                                                    # ψ = β = A γ
        elif "sums" not in message:
            return None
        else:
            L = agreed_map(st, site_names, message["sums"]["xtx"], names)      # ψ = L γ
        ps, p, nt = len(S), len(st.names), len(st.theta_scale) + st.ndisp
        M = np.zeros((ps + nt, p + nt))
        M[:ps, :p] = L
        M[ps:, p:] = np.diag(np.r_[1.0 / st.theta_scale, np.ones(st.ndisp)])     # θ̃ = diag(zs) θ; a dispersion as it is
        info = np.asarray(loc["info"], float)
        xhat = np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
        if info.shape != (ps + nt, ps + nt) or xhat.shape != (ps + nt,):
            return None
        K, h = M.T @ info @ M, M.T @ info @ xhat
        # coded as agreed: the fit itself (lstsq set a negative binomial's ψ, of information e^(−ψ), to 0)
        center = np.linalg.solve(M, xhat) if L is st.A else np.linalg.lstsq(K, h, rcond=None)[0]
        T = None
        if loc.get("third") is not None:
            T = transform_third(np.asarray(loc["third"], float), M)
            T = T if np.all(np.isfinite(T)) else None
    except (KeyError, ValueError, TypeError, IndexError, np.linalg.LinAlgError):
        return None
    ok = all(np.all(np.isfinite(a)) for a in (K, h, center))
    return OwnPart(K, h, center, float(loc["ngroups"]), T) if ok else None


def agreed_map(st, site_names: list, xtx, names: list) -> np.ndarray:
    """L with a site's coefficients of its columns ``names`` (of its one-shot design, ``site_names``) = L γ:
    the regression of the agreed columns on those in the site's cross-products ``xtx`` (exact where the
    agreed ones are those columns or depend on them), an agreed column the site lacks counting as 0.
    ValueError (a name not in the design) or LinAlgError where it cannot be had."""
    S = [site_names.index(nm) for nm in names]
    xmap = np.array([site_names.index(nm) if nm in site_names else -1 for nm in st.names])
    xtx = np.asarray(xtx, float)
    cross = xtx[np.ix_(S, np.maximum(xmap, 0))]
    cross[:, xmap < 0] = 0.0
    return np.linalg.solve(xtx[np.ix_(S, S)], cross) @ st.A


def without_singular(own: dict, sd_index, p: int) -> dict | None:
    """The sites' fits ``own`` with each singular one's θ (and dispersion) left out: its quadratic in β alone,
    with β's marginal information -- or None where no fit is singular (an SD under 1e-3 of the largest, with
    a vector random effect) or every one is.  At a singular fit the information is the boundary's: a
    curvature in the zero SD from the gradient pressing outwards, large where the groups' effects are
    well determined, and couplings that, combined with fits far from that face, drag every parameter
    (stress_methods seed 15 fit 95: a 15-group poisson site at a correlation of 1 pulled the combined SDs
    below every site's own).  The starts it gives are tried beside the others."""
    idx = np.asarray(sd_index, dtype=np.int64)
    if len(idx) < 2:
        return None
    out, singular = {}, 0
    for sid, o in own.items():
        sds = np.abs(o.center[idx])
        if sds.min() > 1e-3 * sds.max():
            out[sid] = o
            continue
        singular += 1
        K = o.K
        Kb = np.zeros_like(K)
        Kb[:p, :p] = K[:p, :p] - K[:p, p:] @ np.linalg.pinv(K[p:, p:]) @ K[p:, :p]
        out[sid] = OwnPart(Kb, Kb @ o.center, o.center, o.ngroups)
    return out if 0 < singular < len(own) else None


def combined_start(own: dict, pseudo=None, each: dict | None = None, x0=None, sd_index=(),
                   radius: float = 3.0, theta_of_x0: bool = False) -> list:
    """Starts (γ, θ̃ stacked) from the sites' own fits ``own`` {site: OwnPart} and the pseudo-data: ``pseudo``
    x -> (f, g, H) of −ℓ over every site's pseudo-data, ``each`` {site: the same for its own} (see the module
    docstring; the sites' own are evaluated once, at their estimates).  The starts: the minimiser of the
    full combination (damped Newton from the quadratic combination and ``x0``, kept within ``radius`` of the
    best of those in the metric of the fits' information: pseudo-data far from the data can make it run off),
    and the quadratic combination of the fits with the standard deviations (positions ``sd_index``) on the
    log scale, where a small site's likelihood is closer to quadratic.  ``theta_of_x0``: also, after those
    two, the quadratic combination with the standard deviations at x₀'s (:func:`given_theta`).  Empty if
    there is nothing to combine."""
    parts = [o for o in own.values() if o is not None]
    if not parts:
        return []
    K, h = sum(o.K for o in parts), sum(o.h for o in parts)
    xlog = log_combination(parts, np.asarray(sd_index, dtype=np.int64))
    # the sites' own pseudo-data to second order at their estimates (in parallel threads where the kernel
    # evaluates them, without the interpreter lock; the numpy engine's work would only take turns)
    mine = [(own[sid].center, P) for sid, P in (each or {}).items() if sid in own and P is not None]
    nogil = all(getattr(P, "nogil", False) for _, P in mine)
    taylor = [(c, *v) for (c, _), v in zip(mine, parallel_map(lambda cp: cp[1](cp[0]), mine, nogil))]
    xq = np.linalg.lstsq(K, h, rcond=None)[0]
    out = [x for x in (xlog,) if x is not None]
    if pseudo is None and np.all(np.isfinite(xq)) and any(o.T is not None for o in parts):
        x = cubic_combination(parts, np.asarray(sd_index, dtype=np.int64), radius)
        return ([x] if x is not None else []) + out
    if pseudo is None or not np.all(np.isfinite(xq)):
        return out or ([xq] if np.all(np.isfinite(xq)) else [])

    def C(x):
        f, g, H = pseudo(x)
        f, g, H = f + 0.5 * x @ K @ x - h @ x, g + K @ x - h, H + K
        for c, fc, gc, Hc in taylor:
            d = x - c
            f, g, H = f - fc - gc @ d - 0.5 * d @ Hc @ d, g - gc - Hc @ d, H - Hc
        return f, g, H

    others = [np.asarray(y, float) for y in (x0, xlog) if y is not None]
    x = _minimise_in_ball(C, xq, K, radius, others)
    if x is not None:
        out.insert(0, x)
    given = given_theta(K, xq, np.asarray(x0, float), sd_index) if theta_of_x0 and x0 is not None and len(sd_index) \
        else None
    out += [given] if given is not None else []
    if all(o.T is not None for o in parts):
        # every site sent third derivatives (no group's moments went: the pseudo-data are pooled bins'),
        # and their cubic combination is tried beside
        cubic = cubic_combination(parts, np.asarray(sd_index, dtype=np.int64), radius)
        out += [cubic] if cubic is not None else []
    return out


def cubic_surrogate(parts: list):
    """x -> (f, g, H): the sum of the sites' fits to third order around their estimates (``parts``, each with
    its T), a stand-in for −ℓ whose third derivatives are the sites' summed -- for the Newton rounds' step
    model (:func:`~fedglmm.coordinator.surrogate.surrogate_model`) where no pseudo-data are made."""
    return _cubic_sum([(o.center, o.K, o.T) for o in parts])


def _cubic_sum(models: list):
    """x -> (f, g, H) of Σ ½ dᵀK d + ⅙ T[d, d, d], d = x − c, over the third-order models ``models``:
    [(c, K, T)]."""
    def cubic(x):
        x, f, g, H = np.asarray(x, float), 0.0, 0.0, 0.0
        for c, K, T in models:
            d = x - c
            Td = T @ d
            f, g, H = f + 0.5 * d @ K @ d + Td @ d @ d / 6.0, g + K @ d + 0.5 * Td @ d, H + K + Td
        return f, g, H

    return cubic


def given_theta(K: np.ndarray, xq: np.ndarray, x0: np.ndarray, held) -> np.ndarray | None:
    """The minimiser of the sites' fits' quadratic combination ½(x − x_q)ᵀK(x − x_q) with the entries ``held``
    (the standard deviations) at x₀'s -- the one-shot fit's random intercept, from the groups whose moments went --
    and the others (γ, a dispersion) free: x_F = x_q,F − K_FF⁻¹ K_FH (x₀,H − x_q,H).  Each source where it is good: a
    site's fit of a few groups knows the slopes within them but not the SD between groups (30 sites of 3
    poisson groups: the fits combined give the SD 0.17-0.36 for 0.31-0.77), and every group's first two
    moments know the SD but, for a count or positive outcome beside real covariates, neither the slopes (0.30
    for 0.51) nor a negative binomial's dispersion; the fits' coupling of γ to the SD (a log link's intercept
    falls as σ²/2 grows) carries γ to it.  None if singular."""
    held = np.asarray(held, dtype=np.int64)
    free = np.setdiff1d(np.arange(len(xq)), held)
    out = np.asarray(x0, float).copy()
    try:
        out[free] = xq[free] - np.linalg.solve(K[np.ix_(free, free)], K[np.ix_(free, held)] @ (out[held] - xq[held]))
    except (np.linalg.LinAlgError, ValueError):
        return None
    return out if np.all(np.isfinite(out)) else None


def _on_log_scale(o: OwnPart, idx: np.ndarray):
    """A fit's centre, information and third derivatives with the entries ``idx`` (standard deviations) on
    the log scale, x_i = exp(y_i) (the chain rule to third order; the gradient is zero at the centre)."""
    c = o.center.copy()
    sd = np.maximum(np.abs(c[idx]), 1e-4)
    J, J2 = np.ones(len(c)), np.zeros(len(c))
    J[idx] = J2[idx] = sd                                   # dx/dy = d²x/dy² = x
    c[idx] = np.log(sd)
    K = o.K * np.outer(J, J)
    T = np.zeros((len(c),) * 3) if o.T is None else np.einsum("abc,a,b,c->abc", o.T, J, J, J)
    KJ2 = o.K * (J[:, None] * J2[None, :])                  # K_ab J_a J2_b
    for b in idx:                                          # the second derivative of x_b in y_b
        T[:, b, b] += KJ2[:, b]
        T[b, :, b] += KJ2[:, b]
        T[b, b, :] += KJ2[:, b]
    return c, K, T


def _log_cubic(parts: list, idx: np.ndarray):
    """The sum of the sites' fits to third order in y (the standard deviations ``idx`` on the log scale), as
    y -> (f, g, H), with the summed information and the quadratic combination's y."""
    logs = [_on_log_scale(o, idx) for o in parts]
    K = sum(L[1] for L in logs)
    yq = np.linalg.lstsq(K, sum(L[1] @ L[0] for L in logs), rcond=None)[0]
    return _cubic_sum(logs), K, yq


def cubic_combination(parts: list, idx: np.ndarray, radius: float):
    """The minimiser of the sum of the sites' fits to third order, with the standard deviations on the log
    scale (where their likelihoods are closer to quadratic), within ``radius`` of the quadratic combination
    in the metric of the summed information; None if it fails."""
    try:
        cubic, K, yq = _log_cubic(parts, idx)
    except (np.linalg.LinAlgError, ValueError):
        return None
    y = _minimise_in_ball(cubic, yq, K, radius)
    if y is None:
        return None
    y[idx] = np.exp(_within_sites(y[idx], parts, idx))
    return y if np.all(np.isfinite(y)) else None


def _within_sites(logsd: np.ndarray, parts: list, idx: np.ndarray) -> np.ndarray:
    """Combined log standard deviations kept within a factor of 2 of the range of the sites' own: a
    combination of their fits beyond that is the coupling of a site's nearly singular information (an SD
    at zero there), not the data (exp(30) was seen)."""
    own = np.log(np.maximum(np.array([np.abs(o.center[idx]) for o in parts]), 1e-4))
    return np.clip(logsd, own.min(axis=0) - np.log(2.0), own.max(axis=0) + np.log(2.0))


def log_combination(parts: list, idx: np.ndarray):
    """The information-weighted combination of the fits with the entries ``idx`` (standard deviations) on the
    log scale: each fit's quadratic is carried to (…, log θ_k, …) by its Jacobian at its own estimate."""
    K, h = 0.0, 0.0
    for o in parts:
        c = o.center.copy()
        sd = np.maximum(np.abs(c[idx]), 1e-4)
        J = np.ones(len(c))
        J[idx] = sd
        c[idx] = np.log(sd)
        Kl = o.K * np.outer(J, J)
        K, h = K + Kl, h + Kl @ c
    try:
        y = np.linalg.lstsq(K, h, rcond=None)[0]
    except (np.linalg.LinAlgError, ValueError):
        return None
    y[idx] = np.exp(_within_sites(y[idx], parts, idx))
    return y if np.all(np.isfinite(y)) else None


def _minimise_in_ball(C, xq, K, radius: float, others=(), iterations: int = 20):
    """Damped Newton on C from the best of x_q and ``others`` (the anchor), within ‖x − anchor‖_K ≤ radius
    (C may be far from quadratic, or unbounded, away from the anchor): each step is cut back to the ball
    and halved until C decreases.  The minimiser, or None."""
    anchor = xq

    def inside(x):
        d = x - anchor
        r = float(np.sqrt(max(d @ K @ d, 0.0)))
        return x if r <= radius else anchor + d * (radius / r)

    try:
        cands = [xq] + list(others)
        vals = [C(y) for y in cands]
        best = int(np.argmin([v[0] if np.isfinite(v[0]) else np.inf for v in vals]))
        x, (f, g, H) = cands[best], vals[best]
        anchor = x
        for _ in range(iterations):
            lam = np.linalg.eigvalsh(H)
            shift = 0.0 if lam[0] > 1e-10 * abs(lam[-1]) else 1e-6 * abs(lam[-1]) - lam[0]
            step = -np.linalg.solve(H + shift * np.eye(len(x)), g)
            if -(g @ step) < 1e-12 * max(1.0, abs(f)):
                break
            for _ in range(30):
                y = inside(x + step)
                fy, gy, Hy = C(y)
                if np.isfinite(fy) and fy < f:
                    break
                step = step / 2.0
            else:
                break
            x, f, g, H = y, fy, gy, Hy
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None
    return x if np.all(np.isfinite(x)) else None


def internal_start(fixef, theta, st) -> tuple[np.ndarray, np.ndarray]:
    """A fit's estimates on the iterative method's internal scale (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
    gamma = np.linalg.solve(st.A, fixef.reindex(st.names).to_numpy())
    return gamma, np.asarray(theta, float) * st.theta_scale


def attenuated(start, st, c: float, factors=(ATTENUATE, 1.0 / ATTENUATE)) -> list:
    """The start (γ, θ̃) with its random intercept's SD σ times each of ``factors`` (default 1.3 and 1/1.3)
    and its fixed effects times √(1 + c·σ'²) / √(1 + c·σ²): a binary model's coefficients grow with σ as the
    marginal ones are attenuated by that factor (Zeger, Liang & Albert 1988; c = 0.346 for the logit, 1 for
    the probit).  A start combined from small sites' fits is furthest off in σ, and along this curve its error
    moves σ and the coefficients together (6 sites of 25 subjects, `benchmarks/follow_up_rounds.py`: the
    rounds over six seeds 5, 3, 4, 4, 4, 5 -> 4, 3, 4, 4, 4, 4)."""
    gamma, theta = np.asarray(start[0], float), np.asarray(start[1], float)
    sd = abs(float(theta[0])) / (float(st.zs[0]) if len(st.zs) else 1.0)
    out = []
    for f in factors:
        r = np.sqrt(1.0 + c * (f * sd) ** 2) / np.sqrt(1.0 + c * sd ** 2)
        out.append((gamma * r, theta * f))
    return out


def binary_intercept(st, family) -> bool:
    """Whether the model is binary, of one grouping factor with its random intercept alone, by a link whose
    attenuation curve :data:`ATTENUATION` knows: the models whose starts move along that curve."""
    return st.mask.shape == (1, 1) and not st.factor_groups and family.name == "binomial" and family.link in ATTENUATION


def totals_variants(st, family) -> tuple:
    """The site totals' start (γ, θ̃) and the points tried beside it in the first round where it is a binary
    model's with one random intercept (no site sent a summary of a group or a fit of its own: every patient
    a site, say), or (None, None) (elsewhere: the fit's own, the SD times √½ and √2).  Those two
    (:func:`sd_variants`), and the SD times 2 and 3 with the coefficients along the attenuation curve
    (:func:`attenuated`) with c = 1.  The moment SD of a binary outcome saturates as σ grows (the variance
    of a group's mean cannot exceed p(1 − p): at p = 0.21 the linearised moment SD is 1.97 for σ = 4.57,
    1.45 for σ = 2), and the start's coefficients are one IRLS step from the null model, short of the
    marginal fit where covariates matter; with the logit's c = 0.346 they grew too little (toenail every
    patient a site: the start 1.42 for σ 4.57, the intercept −1.70 for −4.88).
    `benchmarks/binary_each_rounds.py` (100 patients, 3 seeds): 230 -> 200 rounds (c = 0.346 and no variant
    at √2: 206; the SD times √½ along the curve too: a fit 4 -> 7)."""
    if not binary_intercept(st, family):
        return None, None
    start = start_values(st, family)
    return start, [np.concatenate(x) for x in sd_variants(start, st, family)
                   + attenuated(start, st, TOTALS_CURVE, TOTALS_SD)]


def binary_variants(start, st, family) -> list:
    """Beside a binary start with one random intercept combined from the sites' fits and pseudo-data: its SD
    times 1.3 and 1/1.3 (:func:`attenuated`), and the site totals' start's times 2 and 3 with c = 1, as
    :func:`totals_variants` tries them (held-out toenail over 5 sites 5 -> 4 rounds, AGHQ over 10 sites 6 -> 4)."""
    return attenuated(start, st, ATTENUATION[family.link]) \
        + attenuated(start_values(st, family), st, TOTALS_CURVE, TOTALS_SD)


def sd_variants(start, st, family) -> list:
    """A start (γ, θ̃) with its covariance parameters times √½ and √2 (ψ kept).  With a log link and
    one random intercept of SD σ, the intercept also moves by −(f² − 1)σ²/2 (f the factor), so that the
    marginal mean exp(η + σ²/2) the pseudo-data carry stays where it was: a start whose SD is off is off in
    the intercept by half the difference of the variances, the other way (grouseticks split one location per
    site, the start from the 9 of 63 locations large enough to send summaries: its best point's decrement
    17.5 -> 8.9).  A binary model's coefficients follow its SD along another curve (:func:`attenuated`)."""
    gamma, theta = np.asarray(start[0], float), np.asarray(start[1], float)
    k = int(st.mask.sum())
    sd = float(theta[0]) / float(st.zs[0]) if k else 0.0
    log = family.link == "log" and st.mask.shape == (1, 1) and "Intercept" in st.names
    shift = np.linalg.solve(st.A, np.eye(len(st.names))[st.names.index("Intercept")]) if log else 0.0  # η by 1
    return [(gamma - shift * 0.5 * (f * f - 1.0) * sd * sd, np.r_[theta[:k] * f, theta[k:]])
            for f in (np.sqrt(0.5), np.sqrt(2.0))]


def with_start(starts, extra, default):
    """The first Newton round's starts (None: ``default()``'s alone, one (γ, θ̃) pair, or a tuple of pairs)
    with ``extra`` (a pair, or None) tried beside them, last."""
    if extra is None:
        return starts
    starts = default() if starts is None else starts
    return (tuple(starts) if isinstance(starts[0], tuple) else (starts,)) + (extra,)
