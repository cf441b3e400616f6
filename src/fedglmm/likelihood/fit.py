"""Maximum likelihood on a sum of parts: the trust-region Newton iteration of a GLMM in φ = (γ, θ̃) or of
a gaussian model's profiled criterion in θ̃, with its final step, standard errors and log-likelihood.

Who evaluates the sums is the caller's :class:`Evaluator`: the coordinator's rounds over the sites
(:mod:`fedglmm.coordinator.rounds`), the coordinator's pseudo-data, or a site's own rows
(:class:`LocalEvaluator`).  The iteration is the same in every case.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..model.options import FitOptions
from ..model.spec import diagonal_positions, theta_index
from .covariance_steps import CovarianceSteps
from .drive import run, running_off
from .fused import parallel_map, threads_pay
from .last_step import information_at_estimate, loglik_at_estimate
from .lmm import profiled_deviance
from .newton import TrustRegionNewton
from .setup import Setup, sum_replies
from .third_order import cubic_model
from .third_requests import evaluate_round, finalize_round

GLMM_KEYS = ["value", "grad", "hess"]
THIRD_MAX_FEW = 24      # the most parameters of a fit that asks for the sites' third derivatives where the rows are
THIRD_ROWS = 50_000     # ... at most this many (see _newton_config)
BARE_SETTLE = 1e-7      # an evaluator whose final round may bring no third derivatives (``bare_final``: levels shared
# by sites, whose Hessian is differences of gradients: coordinator.shared_third) settles a last step longer than
# this in H's norm by one more final round where none came (NewtonConfig.bare_settle).  Without it the information
# stayed at the final point, off by T[s] (the secant covers the last move's direction only):
# benchmarks/stress_shared.py's standard errors up to 3.3e-5 from the pooled fit's (40 of 60 fits above 1e-8); with
# it 1.7e-7 (from 1e-8: the same, 8 rounds more), 1.2e-8 once the Hessian's differences were taken at 1e-5
# (coordinator.shared_glmm_rounds.STEP), 408 -> 457 rounds
RUNAWAY = 1e3          # a gaussian start's largest |θ̃| (SDs relative to σ's): beyond it, the default start
LMM_KEYS = ["n", "A", "b", "c", "d"]
LMM_DERIVATIVE_KEYS = ["dA", "db", "dc", "dd", "d2A", "d2b", "d2c", "d2d"]
LMM_THIRD_KEYS = ["d3A", "d3b", "d3c", "d3d"]     # several grouping factors (not shared): the cubic model's


class Evaluator(Protocol):
    """Evaluates the parts' sums: at several points (one round), or at the final point with modes."""

    def evaluate(self, points: list[np.ndarray], keys: list[str]) -> list[dict]: ...

    def finalize(self, point: np.ndarray, keys: list[str], extra: dict | None = None) -> tuple[dict, dict]: ...


class LocalEvaluator:
    """The parts' engines evaluated in this process (no round, nothing counted): ``engines`` maps a part's
    name to its engine (:mod:`fedglmm.likelihood.engine`); ``finalize`` answers like a site without rules."""

    third = False       # no third derivatives: a local fit takes Newton's steps

    def __init__(self, engines: dict, levels: dict):
        self.engines, self.levels = engines, levels
        for eng in engines.values():
            if hasattr(eng, "third"):
                eng.third = False

    def evaluate(self, points, keys):
        names = list(self.engines)
        # the parts are independent: in parallel threads, as the sites of a round are
        done = parallel_map(lambda name: [self.engines[name].sums(np.asarray(x, float)) for x in points], names,
                            threads_pay(self.engines.values()))
        per_part = dict(zip(names, done))
        return [sum_replies({name: r[i] for name, r in per_part.items()}, keys) for i in range(len(points))]

    def finalize(self, point, keys, extra=None):
        extra = extra or {}
        parts = {}
        for name, eng in self.engines.items():
            reply = dict(eng.sums(np.asarray(point, float), final=True))
            if self.levels.get(name) is not None:
                modes, sds = eng.modes(point, extra.get("beta_internal"), extra.get("sigma"))
                lv = self.levels[name]
                reply.update({"levels": dict(lv) if isinstance(lv, dict) else list(lv), "modes": modes, "condsd": sds})
            parts[name] = reply
        return sum_replies(parts, keys), parts


@dataclass
class Estimate:
    """What the iteration ends with, on the internal scale."""

    gamma: np.ndarray               # fixed effects γ (β = Aγ)
    theta: np.ndarray               # θ̃, canonical (non-negative diagonal of Λ̃)
    vcov_gamma: np.ndarray
    loglik: float
    final: dict                     # the parts' replies at the estimate (sums, conditional modes)
    converged: bool
    messages: list = field(default_factory=list)
    sigma2: float | None = None     # gaussian: the residual variance
    info: np.ndarray | None = None  # GLMM: the information of (γ, θ̃, ψ) at the estimate
    step: np.ndarray | None = None  # the estimate less the point of the final sums (internal scale; gaussian:
                                    # in (θ̃, γ, σ), from the θ̃ there and the γ, σ predicted there)
    trace: list = field(default_factory=list)   # (round, objective, Newton decrement) of the iteration
    path: tuple | None = None       # GLMM: x, H (and g) of −ℓ at the last two accepted points, for the
                                    # check of estimates that run off (:mod:`fedglmm.likelihood.runaway`)
    disp: np.ndarray = field(default_factory=lambda: np.zeros(0))   # ψ: the log-dispersion (NB, Gamma)
    vcov_disp: np.ndarray | None = None                              # its covariance


def canonical_theta(theta, mask):
    """Flip columns of Λ so its diagonal is non-negative (Σ = ΛΛᵀ is unchanged)."""
    theta = np.array(theta, float)
    r_idx, c_idx = theta_index(mask)
    for col in np.unique(c_idx):
        diag = np.flatnonzero((c_idx == col) & (r_idx == col))
        if len(diag) and theta[diag[0]] < 0:
            theta[c_idx == col] *= -1.0
    return theta


def _newton_config(options: FitOptions, setup):
    """The Newton settings of a GLMM fit: the sites' third derivatives (NewtonConfig.final_third: at a final point,
    at a round's points near the optimum) cost each site P Hessians, by quadrature (and with several grouping
    factors at a final point) P(P - 1)/2 gradients beside those of its Hessian
    (:func:`fedglmm.site.own_third._stencil_third`) -- asked for after a step to third order at a final point only
    where it is predicted to leave more than THIRD_MOVE (third_at_final; at a final point otherwise as any fit: see
    Ending._final).  A seven-point stencil of P(P + 1) gradients at every final point
    took contraception_gh10 over 3 sites 1.27 times as long; the gradients beside the Hessian's, 1.05-1.11 times.
    On more than THIRD_ROWS rows a final point asks for them only where its decrement is predicted above tol/10
    (``third_final``), as before standard errors to 1e-8 were sought: there P Hessians are P passes over the rows;
    so too with several grouping factors (there never with ``third_at_final`` off).
    A fit of more than ``third_max`` (8) parameters asks for them so too, up to THIRD_MAX_FEW parameters, where
    the sites hold at most THIRD_ROWS rows in all (a few Hessians there cost less than a round's latency):
    guimmun (17 parameters, 2,159 rows) over 10 and 20 sites 6 and 5 -> 4 rounds, contraception_slope over
    3 sites the same 3 rounds in the same time (at every final point too: 1.16 times as long)."""
    cfg = options.newton
    if options.nagq > 1:
        cfg = replace(cfg, third_at_final=False)
    P = len(setup.names) + int(np.sum(setup.mask)) + setup.ndisp
    if cfg.third_max < P <= THIRD_MAX_FEW and setup.n <= THIRD_ROWS:
        cfg = replace(cfg, third_max=THIRD_MAX_FEW, third_at_final=cfg.third_at_final and bool(setup.factor_groups))
    if setup.n > THIRD_ROWS or setup.factor_groups:
        # (P Hessians over the rows, or along the covariance parameters of several factors alone, at a final point
        # only where it may save a round -- see Ending._final --, and not at the starts nor the steps to third order;
        # several factors on at most THIRD_ROWS rows and THIRD_MAX_FEW parameters: every entry, at every final point
        # -- without them the standard errors were more than 1e-8 from the iterative fit's on 9 of 13 held-out
        # multi-level splits (up to 1.9e-6), the information not moved to the estimate by its last step.  From the
        # gradients of the final point's Hessian (site.own_third: P(P - 1)/2 more) fits of 9-24 parameters ask too:
        # parity_multilevel.py's splits above 1e-8 from the pooled fit 2 -> 1 of 53 over 3 sites, 4 -> 1 one site a
        # level (guimmun_la 3.4e-6 -> 1e-10, arabidopsis_la 9.5e-7 -> 6e-9), in 239 -> 238 and 255 rounds; guimmun_la
        # over 161 sites in process 100 -> 144 s, over 3 sites 2.0 -> 2.9 s (the reference cases' multi-level fits
        # 0.78-1.0 times the time they took with P Hessians); at every final point, not only where its decrement is
        # predicted above 1e-15: cbpp_olre's iterative fit ended at 1.2e-11 where 1e-17 was predicted, its standard
        # errors 8.5e-8 off the fit continued to machine precision without them, 2e-11 with them)
        every = setup.factor_groups and setup.n <= THIRD_ROWS and cfg.third_at_final
        cfg = replace(cfg, third_start=False, third_start_cov=False, third_steps=False,
                      third_final=0.0 if every else
                      max(cfg.third_final, cfg.tol / 10 if cfg.third_at_final or not setup.factor_groups else np.inf))
    return cfg


def boundary_positions(mask) -> np.ndarray:
    """Positions in θ of the diagonal entries of Λ alone in their column: the objective is even in each
    (flipping the column leaves ΛΛᵀ as it is), so 0 is a boundary (see :class:`TrustRegionNewton`)."""
    r_idx, c_idx = theta_index(mask)
    return np.array([i for i in diagonal_positions(mask) if np.sum(c_idx == c_idx[i]) == 1], dtype=int)


def _theta_start(mask):
    r_idx, c_idx = theta_index(mask)
    return (r_idx == c_idx).astype(float)


def _penalty_matrix(A: np.ndarray, names: list | None, p: int, lam: float) -> np.ndarray:
    """λ AᵀDA: the penalty λ‖β‖² (intercept excluded, user's scale) as a quadratic form in γ (β = Aγ)."""
    D = np.eye(p)
    if names is not None and "Intercept" in names:
        D[names.index("Intercept"), names.index("Intercept")] = 0.0
    return lam * A.T @ D @ A


def _penalised(P, p: int):
    """(x, f, g, H) -> the objective: −ℓ plus the penalty γᵀPγ on the first ``p`` entries (None: −ℓ)."""
    def penalised(x, f, g, H):
        if P is None:
            return f, g, H
        gam = x[:p]
        g, H = g.copy(), H.copy()
        g[:p] += 2.0 * P @ gam
        H[:p, :p] += 2.0 * P
        return f + gam @ P @ gam, g, H
    return penalised


def fit_glmm(evaluator: Evaluator, setup: Setup, gamma0, theta0, options: FitOptions, starts=None,
             model=None, disp_shifts=(), final_first: bool = False, sound_start: bool = False,
             poisson_limit: bool = False, fallback=None, runaway_stop: bool = False, far: bool = False) -> Estimate:
    """Newton on −ℓ(γ, θ̃) (plus the penalty, applied here: the parts never see λ) from (γ0, θ̃0) and
    ``starts`` (further points of the first round; default: the start's covariance halved and doubled);
    ``disp_shifts``: the first round also tries each of those points with ψ (the last entry) moved by each;
    ``poisson_limit``: ψ (a negative binomial's) may head to ∞, and steps in e^(−ψ) are tried (see
    :func:`~fedglmm.likelihood.steps.tail_step`).
    ``model``: a local step model for the optimiser (:func:`fedglmm.coordinator.surrogate.surrogate_model`).
    A family with a dispersion parameter (``setup.ndisp``) has its ψ as the last entries of θ̃0 and of
    every point.  ``final_first``: (γ0, θ̃0) is believed to be the estimate (a single part's own fit), so
    the first round evaluates it alone and is final: it ends the iteration if the decrement there is below
    ``tol``; ``sound_start``: of several starts, go on from one with a positive-definite Hessian (see
    :class:`~fedglmm.likelihood.newton.TrustRegionNewton`); ``fallback``: the starts of one more first round
    where the objective is not finite at any of these (:func:`~fedglmm.likelihood.starts.domain_start`);
    ``runaway_stop``: estimates that run off end the rounds (:func:`~fedglmm.likelihood.drive.run`); ``far``: a start
    from site totals, where H is indefinite the fixed effects' Newton step with θ held is tried too, with one
    grouping factor as well (counts of 3000 ran off along a ridge of intercept and SD: nb_poisson_limit.py)."""
    p, mask = len(gamma0), setup.mask
    k = int(np.sum(mask))
    P = _penalty_matrix(setup.A, setup.names, p, options.penalty) if options.penalty else None
    penalised = _penalised(P, p)

    def evaluate(xs, final):
        if final:
            s, parts = finalize_round(evaluator, xs[0], opt, GLMM_KEYS)
            sums = [s]
        else:
            if hasattr(evaluator, "iteration_decrement"):     # (how far the iteration is: shared_glmm_rounds.FAR)
                evaluator.iteration_decrement = opt.trace[-1][2] if opt.trace else np.inf
            sums, parts = evaluate_round(evaluator, xs, opt, GLMM_KEYS), None
        return [penalised(x, -float(s["value"]), -s["grad"], -s["hess"]) for x, s in zip(xs, sums)], (parts, sums[0])

    if final_first:
        starts = []
    elif starts is None:
        # the first round also tries the start covariance halved and doubled (local work, no extra round);
        # not with several grouping factors, whose joint moment start gains nothing from them on average
        starts = [np.concatenate([gamma0, f * theta0[:k], theta0[k:]]) for f in (np.sqrt(0.5), np.sqrt(2.0))] \
            if k and not setup.factor_groups else []
    first = [np.concatenate([gamma0, theta0])] + [np.asarray(x, float) for x in starts]
    starts = first[1:] + [np.r_[x[:-1], x[-1] + d] for x in first for d in (() if final_first else disp_shifts)]
    canon = lambda x: np.r_[x[:p], canonical_theta(x[p:p + k], mask), x[p + k:]]   # noqa: E731
    # the optimiser also tries zero variances, and steps in the covariance's entries near a singular one
    edge = tuple(p + boundary_positions(mask))
    config = _newton_config(options, setup)
    if getattr(evaluator, "bare_final", False):
        config = replace(config, bare_settle=BARE_SETTLE)
    opt = TrustRegionNewton(np.r_[gamma0, theta0], config, starts=starts, model=model,
                            boundary=edge, covariance=CovarianceSteps(mask, p) if k else None,
                            predict_final=bool(setup.factor_groups), final_first=final_first,
                            sound_start=sound_start, tails=(p + k,) if poisson_limit else (),
                            faces=True, fixed=0 if setup.factor_groups else p,
                            uncertain=getattr(evaluator, "uncertain", None), third_dear=bool(setup.factor_groups),
                            held=p if setup.factor_groups or far else 0)
    if opt.third_cov:       # (not at a dispersion's shifted starts: grouseticks_nb over 3 sites 1.35 -> 1.1 times
        opt.third_points = list(range(len(first)))      # the time of the fit without them, in as many rounds)
    phi, (final, s), opt = run(opt, evaluate, canon, fallback,
                               running_off(p, diagonal_positions(mask), setup.names) if runaway_stop else None)
    info = -s["hess"]
    if P is not None:
        info[:p, :p] += 2.0 * P      # standard errors from the penalised information
    info = information_at_estimate(opt, info, phi)
    messages = []
    try:
        cov = np.linalg.inv(np.linalg.cholesky(info))
        cov = cov.T @ cov
        vcov_gamma, vcov_disp = cov[:p, :p], cov[p + k:, p + k:]
    except np.linalg.LinAlgError:
        messages.append("the Hessian is not positive definite at the estimate (a variance may be at its "
                        "boundary); standard errors are conditional on the variance parameters")
        vcov_gamma = np.linalg.inv(info[:p, :p])
        vcov_disp = np.linalg.inv(info[p + k:, p + k:]) if len(phi) > p + k else np.zeros((0, 0))
    step = phi - opt.point
    loglik = loglik_at_estimate(s, step, opt)
    path = None if opt.previous is None or opt.current is None else \
        (opt.previous.x, opt.previous.H, opt.current.x, opt.current.H, opt.current.g)
    return Estimate(phi[:p], canonical_theta(phi[p:p + k], mask), vcov_gamma, loglik, final, opt.converged,
                    messages, info=info, trace=list(opt.trace), path=path, disp=phi[p + k:], vcov_disp=vcov_disp,
                    step=step)


def _lmm_starts(start):
    """(start, further starts) from ``start``: one θ̃, or a tuple of them all evaluated in the first round
    (the best kept); a start that is not finite or beyond RUNAWAY is dropped."""
    sound = lambda x: bool(np.all(np.isfinite(x)) and np.max(np.abs(x), initial=0.0) <= RUNAWAY)   # noqa: E731
    cands = [np.asarray(x, float) for x in (start if isinstance(start, tuple) else (start,)) if x is not None]
    cands = [x for x in cands if sound(x)]
    return (cands[0], cands[1:]) if cands else (None, [])


def _lmm_at_estimate(s: dict, setup: Setup, options: FitOptions, opt, sent: dict):
    """(β̂, σ̂², deviance, A, the modes' move) at the estimate, from the final round's sums ``s``.

    With θ (``opt``, the iteration): β̂, σ̂² and the criterion moved from the last point to the estimate along
    the final step (first and second order), as θ̃ is: the same estimate whatever path the iteration took (a
    hybrid start or another split of the rows; one grouping factor: the iteration's Hessian of the
    criterion); and the modes' move, for parts that sent their derivatives in (θ, β, σ) (several grouping
    factors): from the final round's θ and the β̂, σ̂ predicted there (``sent``) to the estimate."""
    if opt is None:
        pr = profiled_deviance(s, options.reml, order=0)
        return pr.beta, pr.sigma2, pr.dev, s["A"], None
    pr = profiled_deviance(s, options.reml, order=2 if setup.factor_groups else 1)
    step = opt.solution - opt.point
    beta, sigma2 = pr.beta + pr.dbeta.T @ step, float(pr.sigma2 + pr.dsigma2 @ step)
    hess = pr.hess if pr.hess is not None else 2.0 * opt.current.H
    dev = float(pr.dev + pr.grad @ step + 0.5 * step @ hess @ step)
    A = s["A"] + np.einsum("t,tpr->pr", step, s["dA"])
    moved = np.r_[step, beta - sent["beta_internal"], np.sqrt(sigma2) - sent["sigma"]] if sent else None
    return beta, sigma2, dev, A, moved


LOST_DIGITS = 1e-6        # residual over total sum of squares below which a gaussian fit is refused


def _check_residual(s: dict) -> None:
    """A gaussian outcome that is constant (or that the fixed effects fit exactly) leaves no residual
    variance: refused, as lme4 refuses a constant response.  Checked at the first point, where Λ̃ is of
    order one, so the random effects cannot absorb the residuals either."""
    rss, c = float(s["c"] - s["b"] @ np.linalg.solve(s["A"], s["b"])), abs(float(s["c"]))
    if rss <= 1e-13 * c:
        raise InputError("the outcome is constant (or the fixed effects fit it exactly) over all sites: there is "
                         "no residual variance to estimate (if it varies by less than a millionth of its mean, "
                         "centre it in the formula, e.g. I(y - 1000))")
    if rss < LOST_DIGITS * c:
        # the sites' sums of squares hold Σy², and the residual variation is what is left when Σy² and the
        # fixed effects' part, both of order n ȳ², cancel: a mean 1e4 SDs from 0 put the logLik 4e-5 off in
        # 14 rounds for 8, 1e5 SDs 3e-3 off in 17-30.  (At Λ̃ = I, c is yᵀV⁻¹y, which the groups' means
        # shrink: the ratio here understates the digits the raw sums lose, by up to 1 + a group's size.)
        raise InputError(f"the outcome's squares sum to {c / rss:.1e} times its residual variation: its mean is so "
                         f"far from 0 against its spread that the fit would lose {np.log10(c / rss):.0f} or more "
                         "of 16 digits; centre it in the formula with a constant near its mean, e.g. I(y - 2000) "
                         "for an outcome y near 2000")


def fit_lmm(evaluator: Evaluator, setup: Setup, options: FitOptions, start=None, covariance: bool = True) -> Estimate:
    """Newton on the profiled REML or ML criterion in θ̃ from ``start`` (default: Λ̃ = I; also instead of a
    start that is not finite or beyond RUNAWAY: a pseudo-data fit of a few groups can run off, and the
    criterion's sums there lose definiteness; a tuple: candidate starts, see :func:`_lmm_starts`).
    ``covariance``: the steps in Σ's entries near a singular Σ (off for a site's own fit, a start only,
    where their chain rule costs more than it gains)."""
    mask = setup.mask
    start, more = _lmm_starts(start)
    ntheta = int(mask.sum())
    # several grouping factors (or levels shared by sites): the sums' third derivatives, for the cubic model
    third = bool(ntheta and setup.factor_groups and getattr(evaluator, "third", False))
    keys = LMM_KEYS + (LMM_DERIVATIVE_KEYS if ntheta else []) + (LMM_THIRD_KEYS if third else [])
    profiles, sent, raw = {}, {}, {}

    def evaluate(xs, final):
        if final:
            # the parts' conditional modes need β̂ and σ̂ at this θ: to first order from the point the
            # final step was taken from (the estimates reported are recomputed from this round's sums)
            base = opt.current.x
            pr, step = profiles[base.tobytes()], xs[0] - base
            extra = {"beta_internal": pr.beta + pr.dbeta.T @ step,
                     "sigma": float(np.sqrt(pr.sigma2 + pr.dsigma2 @ step))}
            sent.update(extra)
            s, parts = evaluator.finalize(xs[0], keys, extra)
            sums = [s]
        else:
            sums, parts = evaluator.evaluate(xs, keys), None
        out = []
        if not profiles:
            _check_residual(sums[0])
        for x, s in zip(xs, sums):
            try:
                pr = profiled_deviance(s, options.reml)
            except np.linalg.LinAlgError:       # a trial θ where the sums lost definiteness: stepped back from
                out.append((np.nan, np.full(len(x), np.nan), np.full((len(x), len(x)), np.nan)))
                continue
            profiles[np.asarray(x, float).tobytes()] = pr
            if third:
                raw[np.asarray(x, float).tobytes()] = s
            out.append((0.5 * pr.dev, 0.5 * pr.grad, 0.5 * pr.hess))
        return out, (parts, sums[0])

    if ntheta:
        edge, others = (), more or None
        if setup.factor_groups:
            # several grouping factors: the joint moment start, and zero variances tried on the way
            from .factor_starts import factor_theta_start

            start = factor_theta_start(setup) if start is None else start
            edge = tuple(boundary_positions(mask))
        # with correlations, the steps in Σ's entries (and the turns off a saddle) near a singular Σ, as for
        # GLMMs: a random slope whose intercept SD is near 0 otherwise crawls along θ's curved valley (REML
        # did not converge in 60 rounds on such a fit)
        r_idx, c_idx = theta_index(mask)
        model = cubic_model(lambda x: raw.get(np.asarray(x, float).tobytes()), options.reml) if third else None
        opt = TrustRegionNewton(_theta_start(mask) if start is None else np.asarray(start, float), options.newton,
                                starts=others, boundary=edge, predict_final=bool(setup.factor_groups), model=model,
                                covariance=CovarianceSteps(mask, 0) if covariance and np.any(r_idx != c_idx) else None)
        theta, (final, s), _ = run(opt, evaluate, lambda x: canonical_theta(x, mask))
        converged, trace = opt.converged, list(opt.trace)
    else:
        theta, converged, trace = np.zeros(0), True, []
        s, final = evaluator.finalize(theta, keys)
        _check_residual(s)
    beta, sigma2, dev, A, moved = _lmm_at_estimate(s, setup, options, opt if ntheta else None, sent)
    return Estimate(beta, canonical_theta(theta, mask), sigma2 * np.linalg.inv(A),
                    # REML's constant depends on how X is parametrised: report it for the user's columns
                    -0.5 * dev + (np.linalg.slogdet(setup.A)[1] if options.reml else 0.0)
                    + 0.5 * float(setup.sums.get("ldw", 0.0)),
                    final, converged, [], sigma2=sigma2, trace=trace, step=moved)
