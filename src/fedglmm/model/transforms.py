"""Stateful transforms with pooled state: ``center(x)``, ``scale(x)``, ``standardize(x)``, ``poly(x, k)``,
``mean(x)`` and ``sd(x)`` mean the same at every site -- the pooled data's -- so the federated fit is the
pooled fit.

A transform that learns from its data (a mean, an SD, polynomial coefficients) would learn, at each site,
from that site's rows: each site would centre on its own mean and the fit would silently not be the pooled
one.  Instead (:mod:`fedglmm.site.site`, :mod:`fedglmm.coordinator.schema`):

1. each site evaluates the formula once with :data:`collect` versions of the transforms, which record, for
   each call (keyed by its text, as formulaic keys transform state), sums of powers of the call's argument
   over the site's rows (:func:`site_statistics`) -- counts and sums, never a row;
2. the coordinator pools them into one state per call (:func:`pool_statistics`);
3. every site, and ``predict`` on new data, evaluates the formula with that state (:func:`evaluate`).

What a site sends per call: its count n_s, its mean m_s, a scale s_s (its SD, 1 if zero) and the sums
Σ u^j, j = 0..2k, of u = (x − m_s)/s_s (k = 1 for centring and scaling, the degree for ``poly``): the raw
power sums Σ x^j written in a numerically safe basis (each is a function of the other given n).  The
coordinator moves every site's sums to the pooled variable t = (x − c)/s (c the pooled mean, s the pooled
SD) by the binomial theorem, with a = s_s/s and b = (m_s − c)/s:  Σ t^j = Σ_i C(j, i) a^i b^(j−i) Σ u^i.

**poly(x, k)** is R's orthogonal polynomial (``stats::poly``): with the empirical inner product
<p, q> = Σ_rows p(x) q(x), the monic orthogonal polynomials P_0 = 1, P_1 = x − α_1,
P_{j+1} = (x − α_{j+1}) P_j − (N_j / N_{j−1}) P_{j−1}, where N_j = <P_j, P_j> and
α_{j+1} = <x P_j, P_j> / N_j; the columns are P_j / sqrt(N_j), j = 1..k (unit length, orthogonal to the
constant and to each other; R's normalisation, with R's sign: a positive leading coefficient).  Every
inner product of two polynomials of degree ≤ k is a combination of the moments Σ x^m, m ≤ 2k
(<Σ_a p_a x^a, Σ_b q_b x^b> = Σ_ab p_a q_b Σ x^(a+b)); so α_1..α_k (which need m ≤ 2k − 1) and
N_0..N_k (m ≤ 2k) are functions of the pooled power sums up to degree 2k, and the recurrence is run on
coefficient vectors against the pooled moments of t (Stieltjes' procedure in moment space), then moved to
x: α = c + s α_t, N_j = s^(2j) N_{t,j}.  The state is R's ``attr(poly(x, k), "coefs")``: ``alpha``
(k values) and ``norm2`` = (1, n, N_1, ..., N_k); new data are evaluated with R's recurrence from them.

**scale(x, center=True, scale=True)** is R's: (x − mean)/sd with the n − 1 SD (without centring, the root
mean square Σx²/(n − 1)); **standardize(x, center=True, rescale=True, ddof=0)** is patsy's (n − ddof);
**center(x)** subtracts the pooled mean; **mean(x)** and **sd(x)** (n − 1) are the pooled numbers, for
``I(x - mean(x))``.  Statistics are taken over the rows the fit uses (after omitting incomplete rows).

Transforms whose state cannot be pooled exactly from such sums are refused before anything is sent
(:func:`check_transforms`): splines without explicit knots and bounds (their knots are quantiles of the
data), ``lag()`` (row order), numpy/pandas reductions (``np.mean(x)``, ``x.mean()``, ``max(x)``: each
site's own), and a pooled transform of a pooled transform.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from math import comb

import numpy as np

from ..errors import InputError

STATEFUL = ("center", "scale", "standardize", "poly", "mean", "sd")
SPLINES = ("bs", "cr", "cs", "cc")
_REDUCTIONS = ("mean", "std", "var", "median", "quantile", "percentile", "min", "max", "sum", "nanmean",
               "nanstd", "nanvar", "nanmedian", "average", "ptp", "amin", "amax", "cumsum", "cumprod", "rank",
               "nanmin", "nanmax", "nansum", "diff")
_BUILTINS = ("sum", "max", "min", "len", "sorted")


# --- which formulas need pooled state, and which cannot have it ----------------------------------------

def python_parts(spec) -> list[str]:
    """The Python expressions of a formula: the calls in its right-hand sides, outcome, cbind, offsets."""
    from formulaic.parser import DefaultFormulaParser

    parser = DefaultFormulaParser()
    rhs = [spec.fixed] + [t.expr for t in spec.random]
    calls = [str(tok) for text in rhs for tok in parser.get_tokens(text) if tok.kind.name == "PYTHON"]
    return calls + [e for e in (spec.response, spec.failures, *spec.offsets) if e]


def _parse(expr: str) -> ast.AST:
    """A Python expression's tree, `quoted names` read as plain names."""
    return ast.parse(re.sub(r"`([^`]+)`", lambda m: "_q" + str(abs(hash(m.group(1)))), expr), mode="eval")


def _name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else ""


def is_stateful(spec) -> bool:
    """True if the formula calls a transform whose state must be pooled (:data:`STATEFUL`)."""
    return any(_name(n) in STATEFUL for e in python_parts(spec) for n in ast.walk(_parse(e))
               if isinstance(n, ast.Call))


def check_transforms(spec, shown: str) -> None:
    """Refuse, with a message saying how to write it, a transform whose state cannot be pooled exactly."""
    for expr in python_parts(spec):
        for node in ast.walk(_parse(expr)):
            if isinstance(node, ast.Call):
                why = _unpoolable(node)
                if why:
                    raise InputError(f"formula '{shown}': {ast.unparse(node)} {why}")


def _unpoolable(node: ast.Call) -> str | None:
    name, f = _name(node), node.func
    keys = {k.arg for k in node.keywords}
    if name in SPLINES and not ({"knots", "lower_bound", "upper_bound"} <= keys or len(node.args) >= 3
                                and {"lower_bound", "upper_bound"} <= keys):
        return (f"places its knots and bounds at quantiles of each site's rows, which cannot be pooled exactly; "
                f"give them: {name}(x, knots=[30, 40, 50], lower_bound=15, upper_bound=50)")
    if name in ("ns", "te"):
        return ("is not available (it would take its knots from each site's rows); write a spline with explicit "
                "knots: cr(x, knots=[30, 40, 50], lower_bound=15, upper_bound=50)")
    if name == "lag":
        return "depends on the order of each site's rows; put the lagged value in a column of the data"
    reduce = (isinstance(f, ast.Attribute) and f.attr in _REDUCTIONS) or name in _BUILTINS
    if reduce:
        return (f"would be computed from each site's own rows, not the pooled data; write mean(x) or sd(x) "
                f"(pooled over all sites), or center(x) / scale(x)")
    if name in STATEFUL:
        inner = [n for a in (*node.args, *(k.value for k in node.keywords)) for n in ast.walk(a)
                 if isinstance(n, ast.Call) and _name(n) in STATEFUL]
        if inner:
            return (f"applies a pooled transform to the result of {ast.unparse(inner[0])}; write one of them "
                    "(poly() is already centred and scaled)")
        if not node.args:
            return "needs the column (or expression) it transforms as its first argument"
    return None


# --- 1. at a site: the sums a call needs ---------------------------------------------------------------

def _sums(x: np.ndarray, order: int) -> dict:
    x = np.asarray(x, dtype=float).ravel()
    x = x[np.isfinite(x)]                # a non-finite value is reported, with its row, by the design
    n = len(x)
    m = float(x.mean()) if n else 0.0
    s = float(x.std()) if n else 1.0
    s = s if s > 0 else 1.0
    u = (x - m) / s
    return {"n": n, "shift": m, "scale": s, "sums": [float(np.sum(u ** j)) for j in range(order + 1)]}


def _collector(kind: str):
    from formulaic.materializers.types import FactorValues
    from formulaic.utils.stateful_transforms import stateful_transform

    @stateful_transform
    def collect(x, *args, _state=None, **kwargs):
        degree = _degree(args, kwargs) if kind == "poly" else 1
        raw = kind == "poly" and bool(kwargs.get("raw", args[1] if len(args) > 1 else False))
        _state["stats"] = {"kind": kind, "degree": degree, "raw": raw, **_sums(x, 2 * degree)}
        n = len(np.asarray(x))
        if kind == "poly":
            return FactorValues(np.zeros((n, degree)), column_names=tuple(map(str, range(1, degree + 1))),
                                format="{name}{field}")
        return 0.0 if kind in ("mean", "sd") else np.zeros(n)

    return collect


def _degree(args, kwargs) -> int:
    degree = kwargs.get("degree", args[0] if args else 1)
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"poly(): the degree must be a whole number ≥ 1, not {degree!r}")
    return int(degree)


@lru_cache(maxsize=1)
def _collect_context() -> dict:
    return {k: _collector(k) for k in STATEFUL}


def collect_context() -> dict:
    """The transforms as a site evaluates them to collect statistics (placeholders as values)."""
    return dict(_collect_context())


def site_statistics(transform_states: list[dict]) -> dict:
    """A site's statistics per call, from the transform states of its collecting evaluations."""
    out = {}
    for states in transform_states:
        for key, st in states.items():
            if isinstance(st, dict) and "stats" in st:
                out[key] = st["stats"]
    return out


# --- 2. at the coordinator: one state per call ---------------------------------------------------------

def pool_statistics(per_site: dict[str, dict]) -> dict:
    """``{call: state}`` from ``{site: {call: statistics}}`` (see the module docstring)."""
    keys = list(dict.fromkeys(k for stats in per_site.values() for k in stats))
    return {key: _pool_one(key, [stats[key] for stats in per_site.values() if key in stats]) for key in keys}


def _pool_one(key: str, parts: list[dict]) -> dict:
    kind, degree = parts[0]["kind"], int(parts[0]["degree"])
    order = 2 * degree
    n = sum(int(p["n"]) for p in parts)
    if n == 0:
        raise InputError(f"{key}: no finite value over all sites")
    sums = [np.asarray(p["sums"], float) for p in parts]
    c = sum(p["shift"] * p["n"] + p["scale"] * s[1] for p, s in zip(parts, sums)) / n
    m2 = sum(p["scale"] ** 2 * s[2] + 2 * p["scale"] * (p["shift"] - c) * s[1] + s[0] * (p["shift"] - c) ** 2
             for p, s in zip(parts, sums))
    m2 = max(float(m2), 0.0)
    state = {"kind": kind, "n": n, "mean": float(c), "m2": m2}
    if kind in ("scale", "standardize", "sd") and m2 <= 1e-24 * max(1.0, c * c) * n:
        raise InputError(f"{key}: its argument is constant over all sites (SD 0): there is nothing to scale by")
    if kind != "poly" or parts[0].get("raw"):
        return state
    sd = np.sqrt(m2 / n) if m2 > 0 else 1.0
    mom = np.zeros(order + 1)
    for p, s in zip(parts, sums):                 # Σ t^j with t = (x − c)/sd, from each site's Σ u^i
        a, b = p["scale"] / sd, (p["shift"] - c) / sd
        for j in range(order + 1):
            mom[j] += sum(comb(j, i) * a ** i * b ** (j - i) * s[i] for i in range(j + 1))
    alpha_t, norm_t = orthogonal_recurrence(mom, degree, key)
    state["alpha"] = [float(c + sd * a) for a in alpha_t]
    state["norm2"] = [1.0] + [float(nm * sd ** (2 * j)) for j, nm in enumerate(norm_t)]
    return state


def orthogonal_recurrence(moments, degree: int, key: str = "poly") -> tuple[np.ndarray, np.ndarray]:
    """α_1..α_k and N_0..N_k of the monic orthogonal polynomials of a discrete measure with moments
    ``moments[m]`` = Σ t^m, m = 0..2k: Stieltjes' procedure on coefficient vectors, where
    <p, q> = Σ_m (p·q)_m moments[m] (the product's coefficients by convolution)."""
    mom = np.asarray(moments, float)

    def inner(p, q):
        prod = np.convolve(p, q)
        return float(prod @ mom[: len(prod)])

    P_prev, P = np.zeros(0), np.ones(1)
    alpha, norms = [], [inner(P, P)]
    for j in range(degree):
        tP = np.r_[0.0, P]                                              # t · P_j
        a = inner(tP, P) / norms[j]
        beta = norms[j] / norms[j - 1] if j else 0.0
        P_prev, P = P, tP - a * np.r_[P, 0.0] - beta * np.r_[P_prev, np.zeros(2)][: j + 2]
        alpha.append(a)
        norms.append(inner(P, P))
        if norms[-1] <= 1e-10 * mom[0]:
            raise InputError(f"{key}: the argument has fewer than {degree + 1} distinct values over all sites "
                             "(R: 'degree' must be less than number of unique points)")
    return np.asarray(alpha), np.asarray(norms)


# --- 3. everywhere: the transforms with the pooled state ------------------------------------------------

def _applier(kind: str):
    from formulaic.materializers.types import FactorValues
    from formulaic.utils.stateful_transforms import stateful_transform

    @stateful_transform
    def apply(x, *args, _state=None, **kwargs):
        if "kind" not in (_state or {}):
            raise RuntimeError(f"{kind}(): no pooled state (the sites' statistics were not collected)")
        st = _state
        if kind == "mean":
            return st["mean"]
        if kind == "sd":
            return float(np.sqrt(st["m2"] / (st["n"] - 1)))
        x = np.asarray(x, dtype=float)
        if kind == "poly":
            degree = _degree(args, kwargs)
            values = (np.column_stack([x ** k for k in range(1, degree + 1)]) if "alpha" not in st
                      else poly_columns(x, st["alpha"], st["norm2"], degree))
            return FactorValues(values, column_names=tuple(map(str, range(1, degree + 1))), format="{name}{field}")
        return _center_scale(kind, x, st, args, kwargs)

    return apply


def _center_scale(kind, x, st, args, kwargs):
    """center / scale (R's, n − 1) / standardize (patsy's, n − ddof) with the pooled n, mean and Σ(x − mean)²."""
    if kind == "center":
        return x - st["mean"]
    names = ("center", "scale", "ddof") if kind == "scale" else ("center", "rescale", "ddof")
    opts = dict(zip(names, args))
    opts.update(kwargs)
    centre = opts.get("center", True)
    rescale = opts.get(names[1], True)
    ddof = opts.get("ddof", 1 if kind == "scale" else 0)
    n, mean = st["n"], st["mean"]
    c = mean if centre is True else (0.0 if centre is False else float(centre))
    if rescale is True:
        ss = st["m2"] + n * (mean - c) ** 2                 # Σ (x − c)²
        div = np.sqrt(ss / (n - ddof))
    else:
        div = 1.0 if rescale is False else float(rescale)
    return (x - c) / div


def poly_columns(x, alpha, norm2, degree: int) -> np.ndarray:
    """R's ``predict`` of ``poly``: the recurrence from ``alpha`` and ``norm2`` (see the module docstring)."""
    x = np.asarray(x, dtype=float)
    Z = np.ones((len(x), degree + 1))
    Z[:, 1] = x - alpha[0]
    for i in range(1, degree):
        Z[:, i + 1] = (x - alpha[i]) * Z[:, i] - (norm2[i + 1] / norm2[i]) * Z[:, i - 1]
    return Z[:, 1:] / np.sqrt(np.asarray(norm2[2: degree + 2]))


@lru_cache(maxsize=1)
def _apply_context() -> dict:
    return {k: _applier(k) for k in STATEFUL}


def apply_context() -> dict:
    """The transforms as evaluated with the pooled state (by formulaic, which hands each call its state);
    without a state they raise, so formulaic's own, learning from the rows at hand, are never used."""
    return dict(_apply_context())
