"""Pseudo-data whose moment sums match given targets: the coordinator's generator for the one-shot method.

In the one-shot method each site sends, once, for every group: the group size and the raw moment sums
``Σ_rows Π_k v_k ** e_k`` of its variables for all exponent vectors ``e`` with ``|e| ≤ K`` (the moment
algebra both sides share is :mod:`fedglmm.model.moments`).  The coordinator generates, group by group,
pseudo rows whose moment sums equal those targets, and fits the model to the pseudo rows.  This package is
that generator; it knows nothing about what the variables mean.  Variables (columns of ``V``) are numbered
``0 .. d-1``; in the one-shot method column 0 is the outcome and the rest are the design columns without the
intercept.

Modules: :mod:`.structure` (validation, standardisation, derived columns), :mod:`.binary` (two-valued
variables, the exact 0/1 block), :mod:`.effective` (the moment equations in effective monomials),
:mod:`.solver` (one group: :func:`generate_group`), :mod:`.order2` (all groups at once for ``K = 2``:
:func:`generate_order2`).

How a group is generated (:func:`generate_group`)
-------------------------------------------------
Internally every variable is centred and scaled by its target mean and SD (binaries: their 0/1 coding);
the targets are transformed alongside (binomial expansion; needs ``expo`` closed under lowering an
exponent, as ``monomials(d, K)`` is -- otherwise variables are only scaled).

1. **Structure read off the moments.**  Some relations between columns are forced by the moments, and
   leaving such a column as a free unknown puts the solution on a singular point of the equations
   (Gauss-Newton then crawls; accuracy stalls near 1e-6).  So, before solving:

   * *binary*: the declared ``binary`` variables; and, when ``K ≥ 4``, any variable whose moments satisfy
     Pearson's bound with equality (kurtosis = skewness² + 1): it takes exactly two values in the data
     and in every solution (0/1 dummies not declared binary, ±1 codings, a dose with two levels);
   * *constant*: zero variance (a group-level covariate is constant within its group);
   * *derived*: a column that is an exact polynomial of the other columns -- affine (collinear columns;
     any K), or of degree 2 when ``K ≥ 4`` (squares such as age², interactions x·z, x1·x2): found by a
     least-squares regression on the moments (``Σ(w − φβ)² = Σw² − cᵀβ`` is zero to rounding; later
     columns are tried first, so age² is derived from age) and computed from the others.  The pseudo
     data keep these relations exactly (the age² column is the square of the age column).

   The remaining real columns are the unknowns (*base* columns).
2. **Binary block.**  Binaries are not unknowns: they are fixed first as an exact 0/1 matrix ``U``.  A
   monomial of binaries depends only on its support ``S`` (``b² = b``): the targets give the joint counts
   ``N_S`` for ``|S| ≤ K``.  Cell counts of the ``2**p`` patterns: Möbius inversion when ``p ≤ K`` (they
   are determined), else a feasibility integer program (:func:`scipy.optimize.milp`, 2 s limit).  If none
   is found, the binaries after the first ``K`` are matched as real variables (``binary_as_real``, with a
   :class:`PseudoDataWarning`); likewise beyond :data:`MAX_BINARY`.  Every variable kept binary has
   exactly ``round(target[e_k])`` ones.
3. **Degrees ≤ 2, closed form.**  With ``Z = [1, U]`` and ``X`` the base columns, the targets give
   ``ZᵀX`` and ``XᵀX``.  Write ``X = Zβ + E`` with ``ZᵀE = 0``: ``β = (ZᵀZ)⁺ZᵀX`` and
   ``EᵀE = W = XᵀX − βᵀZᵀZβ``.  ``E`` is standard normal noise with the columns of ``Z`` projected out,
   orthonormalised (thin SVD: rank deficiency when ``n`` is small is handled) and multiplied by a square
   root of ``W``.  With one binary outcome ``y`` this is: two subgroups (``y = 1``, ``y = 0``), each
   centred on its known mean, pooled within-subgroup covariance ``W``.  For ``K = 2`` this is the answer:
   every moment is exact to rounding (unless a ``nonneg`` variable came out negative: then step 4 runs).
4. **Degrees 3 .. K, nonlinear least squares.**  Every monomial of ``expo`` is expanded into a
   polynomial of the base and binary variables, giving a linear system ``A s = t'`` in the sums ``s`` of
   the distinct *effective* monomials (a derived column raises the degree: Σ(age²)⁴ is a degree-8 moment
   of age).  It is solved once for ``s*`` (SVD); the rows are then found by nonlinear least squares on
   ``(Σ_rows effective monomial − s*) / scale`` -- well conditioned, and free of the duplicate equations
   of the raw system (``y² x = y x``, ``age2 · x = age² · x``).  (If some sums are not identified
   individually, the residuals are the identified combinations.)  The unknowns are the ``n × q`` base
   entries; the solver is Levenberg-Marquardt with an analytic, vectorised Jacobian and the minimum-norm
   step ``δ = −Jᵀ(JJᵀ + μI)⁻¹r`` when there are more unknowns than equations (an ``n_eq × n_eq``
   Cholesky per step); ``nonneg`` entries are parametrised as ``lb + u²``.  Afterwards the degree-≤2
   moments of the base columns are restored exactly by the affine map of ``E`` closest to the identity,
   when that does not increase the error and keeps the bounds.  If the error is above ``tol`` the step is
   restarted from a fresh normal draw (``max_tries``) and the best result is kept.

Small groups: over-determination and disclosure
-----------------------------------------------
The per-group diagnostics report ``unknowns`` (``n × q``) and ``equations`` (identified effective
moments).  When ``unknowns < equations`` the moments generically determine the rows up to their order,
and the least squares usually finds exactly those: the "pseudo" rows are then the real rows (to ~1e-13;
e.g. 20 rows of 4 real variables and K = 4).  That is a property of the summaries, not of this generator
-- a site sending K-th order moments of a small group discloses the group's rows -- but it matters for
the one-shot method's privacy claims.  When the least squares does not find them, the error is reported,
never hidden.

The error reported is the largest :func:`fedglmm.model.moments.relative_errors`: each monomial's miss is
measured against the size its summands have, not against a target that happens to be near 0.
"""
from .order2 import generate_order2
from .solver import MAX_BINARY, PseudoDataWarning, generate_group

__all__ = ["generate_group", "generate_order2", "PseudoDataWarning", "MAX_BINARY"]
