"""What a model is: the notation of the whole package, the parsed formula, the agreed schema and one
site's design matrices.

Notation (used throughout the package; other modules refer here):

* n rows, p fixed-effect columns (X), q random-effect columns (Z) over all grouping factors;
* a grouping factor f (``g``, or ``cask:batch`` for ``(1 | batch/cask)``) has G_f levels and the q_f
  columns of its terms (contiguous in Z: the terms are ordered by factor); every level lives at one site;
* b = Λ u with u ~ N(0, I) for GLMMs, one q_f-vector per level of each factor (Σ_f = Λ_f Λ_fᵀ); for
  gaussian models b = σ Λ u, as in lme4;
* Λ is lower triangular and block-diagonal over the factors (and over uncorrelated terms); its free
  entries θ are those where :attr:`Design.theta_mask` is true, taken column by column (lme4's order: for
  ``(1 + x | g)`` θ = (Λ₁₁, Λ₂₁, Λ₂₂)), hence factor by factor;
* φ = (β, θ) are a GLMM's parameters; η = Xβ + o + Zb the linear predictor, o the offset;
* the internal scale (chosen by the coordinator, applied by every site): X̃ = XA with A centring and
  scaling the columns by their pooled means and SDs, Z̃ = Z / zs; then β = Aγ and θ̃ = diag(zs) θ, and
  a GLMM is fitted in (γ, θ̃), a gaussian model in θ̃ (β and σ profiled out).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def theta_index(mask) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the free entries of Λ in θ's order: column by column, as lme4 orders θ."""
    cols, rows = np.nonzero(np.asarray(mask, bool).T)
    return rows, cols


def diagonal_positions(mask) -> np.ndarray:
    """Positions in θ of the diagonal of Λ."""
    r_idx, c_idx = theta_index(mask)
    return np.flatnonzero(c_idx == r_idx)


def lambda_matrix(theta, q: int, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The q × q lower-triangular Λ with θ in the places ``index`` (from :func:`theta_index`)."""
    lam = np.zeros((q, q))
    lam[index[0], index[1]] = theta
    return lam


NO_GROUP = "."     # group_levels of a model without random terms: one pseudo-group holding all rows


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term such as ``(1 + x | g)``.

    ``expr`` is the left side as a formulaic right-hand side (``"1 + x"``, ``"0 + x"``); ``group`` the
    grouping factor's name as lme4 prints it (``"g"``; ``"cask:batch"`` for the inner factor of
    ``(1 | batch/cask)``); ``correlated`` is False for ``(x || g)`` (each column its own uncorrelated
    term); ``columns`` the data columns whose labels, joined by ``:``, are the factor's levels (default:
    the column ``group``).
    """

    expr: str
    group: str
    correlated: bool = True
    columns: tuple[str, ...] = ()

    @property
    def group_columns(self) -> tuple[str, ...]:
        return self.columns or (self.group,)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed lme4-style formula."""

    formula: str                      # as the user wrote it
    response: str                     # outcome expression (successes for cbind)
    failures: str | None              # cbind(successes, failures): failures expression, else None
    fixed: str                        # fixed-effects right-hand side for formulaic, e.g. "1 + age"
    random: tuple[RandomTerm, ...] = ()
    offsets: tuple[str, ...] = ()     # expressions inside offset(...), and the offset= column
    weights: str | None = None        # the prior-weights column (weights=)
    offset_column: str | None = None  # the column given as offset= (also the last of ``offsets``)

    def with_columns(self, weights: str | None = None, offset: str | None = None) -> "ModelSpec":
        """This model with a prior-weights column and an offset column given beside the formula (the
        ``weights=`` and ``offset=`` of lme4 and glmmTMB)."""
        from dataclasses import replace

        if weights is None and offset is None:
            return self
        offsets = self.offsets + ((offset,) if offset is not None else ())
        return replace(self, weights=weights, offset_column=offset, offsets=offsets)

    @property
    def columns_payload(self) -> dict:
        """What a request carries besides the formula: the weights and offset columns, when there are
        (nothing otherwise, so a request is the same bytes as before there was a choice)."""
        out = {}
        if self.weights is not None:
            out["weights"] = self.weights
        if self.offset_column is not None:
            out["offset"] = self.offset_column
        return out

    @property
    def group(self) -> str | None:
        """The first grouping factor (the only one of a single-factor model)."""
        return self.random[0].group if self.random else None

    @property
    def groups(self) -> tuple[str, ...]:
        """The grouping factors, in the order of their first term (the terms are ordered by factor)."""
        return tuple(dict.fromkeys(t.group for t in self.random))

    def factor_columns(self, group: str) -> tuple[str, ...]:
        """The data columns of grouping factor ``group`` (``("cask", "batch")`` for ``cask:batch``)."""
        return next(t.group_columns for t in self.random if t.group == group)

    @property
    def grouping_columns(self) -> tuple[str, ...]:
        """Every data column a grouping factor uses, in order of first appearance."""
        return tuple(dict.fromkeys(c for t in self.random for c in t.group_columns))


@dataclass
class Schema:
    """What all sites agree on before fitting: the kind of each used column, factor levels and the pooled
    state of stateful transforms (``center(x)``, ``poly(x, 2)``, ...); and how many incomplete rows each
    site left out (``na_action="omit"``)."""

    kinds: dict[str, str]                     # column -> "numeric" | "categorical"
    levels: dict[str, list[str]] = field(default_factory=dict)   # categorical column -> levels
    omitted: dict[str, int] = field(default_factory=dict, compare=False)   # site -> rows omitted (missing values)
    transforms: dict[str, dict] = field(default_factory=dict)     # call -> pooled state (model/transforms.py)
    # grouping factor -> {level: number of sites holding it}, for the levels at two or more sites
    shared: dict[str, dict] = field(default_factory=dict, compare=False)
    nlevels: dict[str, int] = field(default_factory=dict, compare=False)   # factor -> levels over all sites


@dataclass(frozen=True)
class Grouping:
    """One grouping factor at one site: its name, each row's level (codes into ``levels``, the site's own
    labels in natural order) and the columns of Z that belong to its terms."""

    name: str
    codes: np.ndarray
    levels: list[str]
    columns: np.ndarray

    @property
    def q(self) -> int:
        return len(self.columns)


@dataclass
class Design:
    """One site's model matrices, rows sorted by group.

    ``y`` holds successes for binomial, counts for poisson, values for gaussian; ``trials`` is the
    binomial trials (1 for a 0/1 outcome), and for the other families the prior weight (gaussian:
    precision weight; poisson, negative binomial, Gamma: the weight of the row's log-likelihood), 1 without
    ``weights=``; ``weighted`` says that weights were given.  ``group`` are codes 0..G-1 into ``group_levels`` and are
    non-decreasing (rows sorted by group), so per-group sums are ``np.add.reduceat(.., starts)``.
    With several grouping factors, ``factors`` holds each one (:class:`Grouping`) and ``group`` /
    ``group_levels`` / ``group_name`` are those of the first, by which the rows are sorted.
    """

    y: np.ndarray
    trials: np.ndarray
    offset: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    group: np.ndarray
    group_levels: list[str]
    x_names: list[str]
    z_names: list[str]
    theta_mask: np.ndarray                   # (q, q) lower-triangular bool pattern of Λ
    group_name: str | None = None
    factors: tuple[Grouping, ...] = ()      # several grouping factors (empty: ``group`` is the only one)
    weighted: bool = False                  # prior weights were given (``trials`` holds them)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def groupings(self) -> tuple[Grouping, ...]:
        """Every grouping factor of the design (none for a GLM)."""
        if self.factors:
            return self.factors
        q = self.Z.shape[1]
        return (Grouping(self.group_name, self.group, list(self.group_levels), np.arange(q)),) if q else ()

    @property
    def starts(self) -> np.ndarray:
        """Index of the first row of each group."""
        return np.flatnonzero(np.r_[True, self.group[1:] != self.group[:-1]]) if self.n else np.zeros(0, int)
