"""The hybrid method (the default): one one-shot round, then exact Newton rounds on the real sites.

Stages: the sites' one-shot messages (moments up to order 2, the least revealing, and each site's own fit
of its rows, :mod:`fedglmm.site.own_fit`) -> with one site, its own fit, which the first Newton round checks
and ends on; with several, the pseudo-data fit at the coordinator and the combinations of the sites' own
fits with the pseudo-data (:mod:`fedglmm.coordinator.starts`), tried together in the first Newton round (with
the site-totals start where summaries are missing) -> Newton rounds whose steps the pseudo-data surrogate
proposes (:mod:`fedglmm.coordinator.surrogate`) -> the result, its conditional modes moved to the estimate.
Gaussian models whose per-group statistics all arrived are exact after the first round (unless levels are
shared by sites: the stand-ins of one site do not know the others', so the Newton rounds follow).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..coordinator.assemble import assemble, shared_note
from ..coordinator.between import one_level_fits, one_level_start
from ..coordinator.messages import merge_messages
from ..coordinator.own_combination import (MIN_LEVELS, factor_combined_start, factor_fits, factor_log_start,
                                           gaussian_own_start, shared_level_modes)
from ..coordinator.rounds import estimate, pooled_transforms, setup_request
from ..coordinator.schema import check_outcome
from ..coordinator.session import Link, Session
from ..coordinator.shared_blocks import ONE_SHOT_NOTE, merge_shared_levels
from ..coordinator.shared_rounds import shared_setup
from ..coordinator.split_start import one_shot_split
from ..coordinator.starts import (OwnPart, binary_intercept, binary_variants, combined_start, cubic_surrogate,
                                  internal_start, own_part, sd_variants, totals_variants, with_start, without_singular)
from ..coordinator.surrogate import pseudo_objective
from ..coordinator.virtual import fit_stand_ins, stand_ins
from ..errors import FedGLMMError
from ..likelihood.setup import make_setup
from ..likelihood.factor_starts import factor_theta_start
from ..likelihood.runaway import ran_off
from ..likelihood.starts import start_values
from ..model.frame import na_payload
from ..model.options import POOLED_MAX_GROUPS, FitRequest
from ..model.spec import diagonal_positions
from ..protocol import request
from ..results import FitResult, RunStats
from .hybrid_gates import _blocks_keep_digits, _fits_suffice, _kept_groups, _kept_share, _lean, _sd_index, \
    exact_moments

HYBRID_ORDER = 2           # the hybrid needs only a start: means and covariances reveal the least
HYBRID_COMPRESS = 4.0      # the hybrid's binomial pseudo rows stand for up to 4 observations each
KEPT_MOST = 0.9           # the share of groups whose summaries stayed at their sites from which the starts bring the
                          # sites' third derivatives (_newton_options)
OWN_NEAR = 0.5            # with such fits alone: decrement below which the Newton step is the final candidate
                          # (and the surrogate's, where every group's moments made the pseudo-data)
LEVEL_SD_FLOOR = 1e-3     # a pseudo-data fit of shared levels' moments starts the fit where its SDs exceed this
LEVEL_ROWS = 4            # a site's own fit of one factor starts a fit with shared levels from this many rows a level


def _pseudo_fit(merged, replies, req: FitRequest, seed: int, fit: bool = True, exact: bool = False):
    """The one-shot estimate from the groups the sites did send (all of them, unless some were small),
    as (stand-ins, assembled fit); None if it cannot be had (the Newton rounds then start from the site
    totals).  Only a start, so not polished, and by Laplace: the pseudo-data differ from the data by
    more than AGHQ does from Laplace.  ``fit=False``: the stand-ins alone, (stand-ins, None, None, None).
    ``exact``: the sums carry the likelihood (:func:`~fedglmm.methods.hybrid_gates.exact_moments`): rows not
    compressed, and the fit by the fit's own options -- it is the estimate."""
    options = req.options
    loose = options if req.family.name == "gaussian" or exact else \
        replace(options, nagq=1, newton=replace(options.newton, tol=1e-4, near=1e-2))
    try:
        parts, _ = stand_ins(merged, replies, loose, seed, 1.0 if exact else HYBRID_COMPRESS, bins=True)
        if not fit:
            return parts, None, None, None
        schema, st, est = fit_stand_ins(parts, req.spec, req.family, loose, merged.schema.transforms)
        return parts, assemble(req.formula, req.family, loose, req.spec, schema, st, est), st, est
    except (FedGLMMError, np.linalg.LinAlgError, ValueError):
        return None


def _levels_named(st, own: dict) -> dict:
    """The sites' own fits with their numbers of levels by factor (``levels``): a fit of one grouping factor
    (levels shared by sites count as several factors) sends ``ngroups`` only.  Without it, a start from
    such fits used none of them (a poisson model without intercept over 2 sites, every level at both:
    the site totals' start, slope 2.7 for 0.5, then 34 rounds; now the sites' fits, 0.496)."""
    names = list(st.factor_columns())
    if len(names) != 1:
        return own
    return {sid: o if "levels" in o or not o.get("ngroups") or o.get("n", 0.0) < LEVEL_ROWS * o["ngroups"]
            else {**o, "levels": {names[0]: o["ngroups"]}} for sid, o in own.items()}


def _starts(req, st, merged, own: dict, pseudo, big: str | bool = False, by_level: bool = False):
    """The Newton rounds' start(s) and the surrogate (see the module docstring): a tuple of (γ, θ̃) starts,
    all tried in the first Newton round (the best kept), or None (the set-up start).  ``own``: the sites'
    own fits, as sent (several grouping factors) or as :class:`~fedglmm.coordinator.starts.OwnPart`.
    Where small groups' summaries stayed at their sites, a binary model with one random intercept also tries
    its first start's SD and the site totals' moved along the attenuation curve
    (:func:`~fedglmm.coordinator.starts.binary_variants`) -- not beyond POOLED_MAX_GROUPS groups, where the
    sites' fits of their many groups combine well and four more points cost every site."""
    starts, surrogate = _candidates(req, st, merged, own, pseudo, big, by_level)
    fam = req.family
    if starts is None or not merged.refused or not binary_intercept(st, fam) or st.ngroups > POOLED_MAX_GROUPS:
        return starts, surrogate
    many = list(starts) if isinstance(starts[0], tuple) else [starts]
    return tuple(many + binary_variants(many[0], st, fam)), surrogate


def _candidates(req, st, merged, own: dict, pseudo, big: str | bool = False, by_level: bool = False):
    """:func:`_starts` but the attenuation variants.  ``big``: what :func:`~.hybrid_gates._fits_suffice` said
    ("many", "third" or False); ``by_level``: the pseudo-data fit is of each shared level's moments added up
    over its sites."""
    family, p = req.family, len(st.names)
    if st.factor_groups:
        # several grouping factors: the sites' own fits, and the site-totals start beside them (one factor
        # with levels shared by sites counts as several; a gaussian site's fit of one factor is not used)
        own = factor_fits(st, own) if family.name == "gaussian" else factor_fits(st, _levels_named(st, own))
        if not own or family.name == "gaussian" and not any("levels" in o for o in own.values()):
            return None, None
        totals = factor_theta_start(st) if family.name == "gaussian" else start_values(st, family)
        combined, complete = factor_combined_start(st, list(own.values()), totals)
        # beside it, the fits of the full model combined by their information (not gaussian: its fits send
        # none); the site-totals start where the sites' fits left parts of the start to them
        logs = factor_log_start(st, list(own.values())) if family.name != "gaussian" else []
        if family.name == "gaussian":
            # a variance between sites went in: the start with the site totals' for that factor beside (on the
            # splits of one hospital per site, chem97 6 -> 4 rounds with it, sim_gauss3 4 with either alone)
            plain = factor_combined_start(st, list(own.values()), totals, False)[0]
            return (combined if np.array_equal(plain, combined) else (combined, plain)), None
        many = [combined] + logs + ([] if complete else [totals])
        level = internal_start(pseudo[1].fixef, pseudo[1].theta, st) if by_level and pseudo is not None \
            and pseudo[1] is not None else None
        if level is not None and np.all(np.abs(level[1][diagonal_positions(st.mask)]) > LEVEL_SD_FLOOR):
            # each shared level's moments over all its sites: the pseudo-data fit (not where an SD came out
            # at zero: Newton from that boundary crawled, 7 -> 14 rounds on one of stress_shared.py's fits)
            many.insert(0, level)
        return (many[0] if len(many) == 1 else tuple(many)), None
    pair = lambda x: (x[:p], x[p:])                                     # noqa: E731
    # beside the sites' fits combined, the same with a singular fit's θ left out (without_singular)
    free = without_singular(own, _sd_index(st), p) if own and family.name != "gaussian" and not big else None
    also = (lambda *a: combined_start(free, *a)[:2]) if free else (lambda *a: [])       # noqa: E731
    if pseudo is None and own and family.name == "gaussian":
        # every group's statistics kept at its site: the sites' own fits combined (a gaussian site's fit has
        # no information matrix: by numbers of groups)
        return gaussian_own_start(st, list(own.values())), None
    if pseudo is None:
        if own and family.name != "gaussian":
            combined = combined_start(own, sd_index=_sd_index(st))
            if combined and big:
                # every site fitted its many groups: their combination alone (no covariance halved and
                # doubled beside it: two points' work at every site for nothing), and plain Newton steps; where
                # every site sent its third derivatives, their combination to third order alone, and steps from
                # their sum as the model (the log-scale combination beside changed no fit's rounds on
                # benchmarks/many_groups_rounds.py's 120 draws, and cost every site a point)
                cubic = cubic_surrogate(list(own.values())) if all(o.T is not None for o in own.values()) else None
                return tuple(pair(x) for x in (combined[:1] if cubic else combined)), cubic
            if combined:
                nx = len(st.names) + int(st.mask.sum()) + st.ndisp
                zero = lambda x: (0.0, np.zeros(nx), np.zeros((nx, nx)))   # noqa: E731
                more = also(None, None, None, _sd_index(st))
                return tuple(pair(x) for x in combined) + (start_values(st, family),) + tuple(map(pair, more)), zero
        return None, None
    parts, first = pseudo[:2]
    start = internal_start(first.fixef, first.theta, st) if first is not None else None
    if start is not None and st.ndisp:          # a negative binomial's or Gamma's pseudo-data fit: its ψ too
        start = (start[0], np.r_[start[1], np.asarray(pseudo[3].disp, float)])
    if start is not None and family.name == "gaussian":
        return start[1], None
    surrogate = pseudo_objective(parts, st)
    each = {sid: pseudo_objective({sid: part}, st) for sid, part in parts.items() if sid in own}
    if start is None:
        # every site's fit and every group's summaries, the stand-ins not fitted: the fits combined, their
        # shape from the pseudo-data
        return tuple(pair(x) for x in combined_start(own, surrogate, each, None, _sd_index(st))
                     + also(surrogate, each, None, _sd_index(st))) or None, surrogate
    # first round: the one-shot fit, its covariance halved and doubled, the sites' fits combined (one_shot_split too),
    # site totals' start where summaries stayed or ψ is fitted (pseudo-data carry ψ roughly: shape_sweep 84 10 -> 4)
    variants = sd_variants(start, st, family) if len(start[1]) and not own else []
    # (a random intercept: the one-shot SD is good, also where small groups stayed -- not a dispersion's -- and the
    # combination's γ given it is tried beside; a slope's is not: benchmarks/README.md, 7 December, night)
    given = st.mask.shape == (1, 1) and not (merged.refused and st.ndisp)
    combined = combined_start(own, surrogate, each, np.concatenate(start), _sd_index(st), theta_of_x0=given) \
        + one_shot_split(own, parts, st, np.concatenate(start)) if own else []
    totals = [start_values(st, family)] if merged.refused or st.ndisp else []
    more = also(surrogate, each, np.concatenate(start), _sd_index(st)) if own else []
    starts = tuple([pair(x) for x in combined] + [start] + variants + totals + [pair(x) for x in more])
    return (starts[0] if len(starts) == 1 else starts), surrogate


def _note(replies, merged, own, pseudo) -> str:
    """Where the start came from when some sites kept small groups' summaries."""
    if any(isinstance(r["ngroups"], dict) for r in replies.values()):       # several grouping factors: cells
        return (f"per-cell summaries stayed at {len(merged.refused)} site(s) (cells below a site's minimum size); "
                "the Newton rounds, which use every row, started from "
                + ("the sites' own fits" if own else "site totals"))
    ngr = sum(_kept_groups(r) for r in replies.values() if r.get("refused"))
    what = f"{ngr} group(s) at {len(merged.refused)} site(s), below a site's minimum size or the moment rule"
    binned = _binned(merged) if pseudo is not None else 0
    if binned:
        what += f"; {binned} of them went only pooled in bins of several groups"
    source = ("the sites' own fits combined in the shape of pseudo-data from the groups' summaries and bins"
              if own and binned else
              "the sites' own fits combined with the one-shot fit of the other groups" if own and pseudo is not None
              else "the sites' own fits" if own else
              "the one-shot fit of the other groups" if pseudo is not None else "site totals")
    return (f"summaries of small groups stayed at their sites ({what}); the Newton rounds, which use every "
            f"group, started from {source}")


def _newton_options(options, fam, merged, replies, own: dict, surrogate, big):
    """The Newton rounds' settings, by where the start came from; the steps to third order bring the sites' third
    derivatives too (NewtonConfig.third_steps; not over more than 50,000 rows: likelihood.fit._newton_config)."""
    options = replace(options, newton=replace(options.newton, third_steps=True))
    if big:
        options = replace(options, newton=replace(options.newton, near=OWN_NEAR, near_model=OWN_NEAR))
    elif surrogate is not None and not merged.refused and not merged.pooled and fam.name in ("binomial", "poisson"):
        # every group's moments in the pseudo-data (and no dispersion they carry only roughly): the surrogate's
        # step is the final candidate from a decrement of OWN_NEAR (benchmarks/stress_shapes.py seeds 21-40 641 ->
        # 629 rounds, 1e5 rows over 100 sites 4 -> 3, none longer on the other rounds benchmarks; where it misses,
        # the final round's sums go twice in as many rounds: cbpp_cloglog over 3 sites 13 % more bytes)
        options = replace(options, newton=replace(options.newton, near_model=OWN_NEAR))
    if merged.refused and not big and _kept_share(replies) >= KEPT_MOST:
        # (almost) every group's summaries stayed at its site: the start comes from site totals or from the sites' fits
        # of their groups -- far, where each site holds a few --, and the first round's points bring the sites' third
        # derivatives too (NewtonConfig.third_start; see likelihood.fit._newton_config): from site totals, along all
        # parameters (benchmarks/rounds_heldout.py 650 -> 643 rounds, above 4 in 17 -> 13); beside the sites' fits,
        # along the covariance parameters alone (third_start_cov: epil as a negative binomial over 5-10 sites, 5 -> 4).
        # Not where sites sent most groups' summaries: the start is close there, and along all parameters at every
        # start they took the reference cases over 3 sites up to twice the time in as many rounds (along the
        # covariance parameters where 90 % of groups stayed: 1.03-1.17 times, grouseticks, sleepstudy_gamma with rules)
        which = "third_start_cov" if own else "third_start"
        options = replace(options, newton=replace(options.newton, **{which: True}))
    return options


def _binned(merged) -> int:
    """How many small groups the sites sent pooled in bins."""
    return sum(int(np.sum(b["k"])) for b in merged.pooled.values())


def _nsites(transport) -> int | None:
    try:
        return len(transport.site_ids)
    except Exception:       # noqa: BLE001 -- a transport that cannot tell before its first round
        return None


def _local(fam, options, nsites: int | None) -> dict:
    """What a site's own fit is asked for: a site also fits its own rows (one grouping factor), to the last
    digit when it is the only site (its fit is then the fit)."""
    local = {"nagq": options.nagq, "curvature": options.curvature}
    if fam.name == "gaussian" and not options.reml:
        local["reml"] = False            # the site's own fit (several grouping factors) by ML, as the fit
    if nsites == 1:
        local["exact"] = True            # the one site's own fit is the fit
    if nsites:
        local["sites"] = nsites
    return local


def fit_hybrid(transport, req: FitRequest, seed: int = 0) -> FitResult:
    """The one-shot round, then exact Newton rounds on the real sites from its estimate."""
    t0 = time.perf_counter()
    fam, options = req.family, req.options
    order = HYBRID_ORDER if req.moments is None else req.moments
    transforms = pooled_transforms(transport, req.formula, req.spec, fam, req.na_action)    # center(x), ...: a round
    local = _local(fam, options, _nsites(transport))
    replies = transport.broadcast(request("oneshot", formula=req.formula, family=fam.name, link=fam.link, order=order,
                                          local=local, **na_payload(req.na_action),
                                          **({"transforms": transforms} if transforms else {}),
                                          **req.spec.columns_payload))
    merged = merge_messages(replies, req.formula, fam, transforms, req.spec)
    if _binned(merged) > POOLED_MAX_GROUPS:
        merged.pooled.clear()       # pseudo-groups for that many would cost the coordinator more than a round
    secure = bool(getattr(transport, "secure", False))
    st = None if secure else shared_setup(make_setup(merged.setup, fam.ndisp), merged.schema)
    if st is not None:
        check_outcome(st, req.spec, fam)
    payload = setup_request(req.formula, fam, options, merged.schema, req.na_action, req.spec.columns_payload)
    own = {sid: r["local"] for sid, r in replies.items() if r.get("local") is not None}
    if len(replies) == 1 and own:
        # one site: its own fit is the fit; the first round checks it and collects the modes
        st = _secure_setup(transport, payload, req, merged) if secure else st
        own = _own_parts(own, replies, st)
        start = _alone_start(own, st, fam)
        if start is not None:
            est = estimate(transport, st, fam, options, start, first=None if secure else {"setup": payload},
                           final_first=True, mode_derivatives=True)
            return _result(transport, req, merged, st, est, payload, t0, replies, own, None)
    if st is None and fam.name != "gaussian":
        # secure: the site totals' total, in a masked set-up round -- before the start is chosen, so that it
        # is chosen as in a plain fit
        st = _secure_setup(transport, payload, req, merged)
    alone, own = one_level_fits(own, replies, st)      # (one factor, sites of one level each: fits without it)
    if st is not None:
        own = _own_parts(own, replies, st)         # the sites' fits in the agreed coding, once
    exact = st is not None and exact_moments(merged, req, replies)          # (the one-shot fit is the estimate)
    big = st is not None and not exact and _fits_suffice(own, replies, merged, req, st)
    lean = st is not None and not big and not exact and _lean(own, replies, merged, req, st)
    by_level = merge_shared_levels(merged, moments=True) if st is not None else None     # shared levels' sums added
    # (a GLMM with several grouping factors, or levels shared by sites, starts from a pseudo-data fit only of
    # the levels' merged moments: without them none is made)
    unused = fam.name != "gaussian" and st is not None and bool(st.factor_groups) and by_level is None
    pseudo = _pseudo_fit(by_level or merged, replies, req, seed, fit=not lean, exact=exact) \
        if (any(b is not None for b in merged.blocks.values()) or merged.pooled) and not big and not unused else None
    if pseudo is not None and fam.name == "gaussian" and not merged.refused \
            and (not merged.schema.shared or by_level is not None) and (st is None or _blocks_keep_digits(st)):
        # per-group sufficient statistics give the exact fit: nothing is left to iterate
        run = RunStats(transport.rounds, transport.bytes_to_sites, transport.bytes_from_sites,
                       time.perf_counter() - t0, tuple(replies), secure)
        res = FitResult.build(pseudo[1], run)
        res.messages += [shared_note(st, ONE_SHOT_NOTE)] if by_level is not None else []
        res.session = Session(Link(transport, setup=payload), req.formula, fam, options, req.spec, merged.schema,
                              pseudo[2] if by_level is None else st, pseudo[3])     # (st: the levels shared)
        return res
    if st is None:             # secure gaussian: the set-up after all
        st = _secure_setup(transport, payload, req, merged)
        own = _own_parts(own, replies, st)
    exact = exact and _one_shot_estimate(pseudo)
    if exact:
        start, surrogate, variants = internal_start(pseudo[1].fixef, pseudo[1].theta, st), None, None
    else:
        start, surrogate = _starts(req, st, merged, own, pseudo, big, by_level is not None)
        start = with_start(start, one_level_start(st, alone, MIN_LEVELS), lambda: start_values(st, fam))  # level a site
        start, variants = (start, None) if start is not None else totals_variants(st, fam)  # nothing but the totals
    options = _newton_options(options, fam, merged, replies, own, surrogate, big)
    # the conditional modes move to the estimate with their derivatives; where the sites' fits alone start
    # from their many groups ("many"), the modes alone: their SDs' derivatives would cost each site a pass of
    # ~15 over its rows (0.1 s of CPU per 1e5), for SDs 1e-6 off at 1e6 rows (bench_scale.py), where the modes
    # were 5.5e-6 off (with fewer groups, "third", the SDs were up to 4e-6 off: benchmarks/stress_shapes.py)
    est = estimate(transport, st, fam, options, start, first=None if secure else {"setup": payload},
                   surrogate=surrogate, final_first=exact, mode_derivatives="modes" if big == "many" else True,
                   shared_modes=_level_modes(pseudo) if by_level is not None else
                   shared_level_modes(st, own, start), variants=variants)
    return _result(transport, req, merged, st, est, payload, t0, replies, own, pseudo)


def _one_shot_estimate(pseudo) -> bool:
    """Whether the one-shot fit, where the sums carry the likelihood, is the estimate: made, and its estimates do
    not run off (separation, which it reached only as its gain per step fell below the tolerance: the Newton
    rounds then name what runs off, as the iterative method does)."""
    return pseudo is not None and pseudo[1] is not None and not ran_off(pseudo[3], pseudo[2].names, pseudo[2].mask)


def _level_modes(pseudo) -> tuple | None:
    """The pseudo-data fit's conditional modes and SDs by factor (user's scale), where it was made of each
    shared level's moments over all its sites: the shared effects' start."""
    res = pseudo[1] if pseudo is not None else None
    if res is None or res.modes is None:
        return None
    by = (lambda m: m if isinstance(m, dict) or m is None else {res.group_name: m})     # noqa: E731
    return by(res.modes), by(res.condsd)


def _alone_start(own: dict, st, fam):
    """The one site's own fit (``own``: :func:`_own_parts`) as the (γ, θ̃) start -- θ̃ alone for a gaussian
    model with several grouping factors -- or None where it is not coded as agreed."""
    if not own:
        return None
    if st.factor_groups:
        loc = next(iter(own.values()))
        if list(loc.get("names", [])) != list(st.names) or list(loc.get("z_names", [])) != list(st.znames):
            return None
        k = int(st.mask.sum())
        theta = np.asarray(loc["theta"], float)
        start = np.r_[theta[:k] * st.theta_scale, theta[k:]]
        if fam.name == "gaussian":
            return start
        return np.linalg.solve(st.A, np.asarray(loc["beta"], float)), start
    x, p = next(iter(own.values())).center, len(st.names)
    return x[:p], x[p:]


def _secure_setup(transport, payload, req, merged):
    """The set-up from the site totals' total, in a masked round."""
    st = shared_setup(make_setup(transport.broadcast(payload), req.family.ndisp), merged.schema)
    check_outcome(st, req.spec, req.family)
    return st


def _own_parts(own: dict, replies: dict, st) -> dict:
    """The sites' own fits in the agreed coding (:func:`~fedglmm.coordinator.starts.own_part`); with several
    grouping factors as sent (:func:`~fedglmm.coordinator.own_combination.factor_combined_start` reads them)."""
    if st.factor_groups:
        # a fit without a factor the site holds one level of, and without the columns its others determine
        # there, is mapped to the agreed coding through the site's XᵀX (coordinator.between)
        return {sid: dict(loc, site_x=(replies[sid]["x_names"], replies[sid]["sums"]["xtx"]))
                if isinstance(loc, dict) and loc.get("alone") and "xtx" in replies[sid].get("sums", {}) else loc
                for sid, loc in own.items()}
    if not own or isinstance(next(iter(own.values())), OwnPart) \
            or next(iter(own.values())).get("info") is None:        # (gaussian: θ̂ alone)
        return own
    parts = {sid: own_part(loc, replies[sid], st) for sid, loc in own.items()}
    return {sid: o for sid, o in parts.items() if o is not None}


def _result(transport, req, merged, st, est, payload, t0, replies, own, pseudo) -> FitResult:
    fit = assemble(req.formula, req.family, req.options, req.spec, merged.schema, st, est)
    if merged.refused and not merged.unsupported:
        fit.messages.append(_note(replies, merged, own, pseudo))
    res = FitResult.build(fit, RunStats.of(transport, t0))
    res.session = Session(Link(transport, payload), req.formula, req.family, req.options, req.spec, merged.schema,
                          st, est)
    return res
