"""A group's conditional mode that Newton does not reach from its start within MODE_ITERATIONS steps fails the
evaluation there (likelihood.mode_start), and likelihood.restarts starts the modes elsewhere, rather than give a
value far off as the point's -- in the fused kernel and in the numpy engine alike."""
from __future__ import annotations

import numpy as np
import pytest

from fedglmm.likelihood import fused
from fedglmm.likelihood.laplace import GLMMLikelihood
from fedglmm.model.families import get_family
from test_likelihood import make_design


@pytest.mark.parametrize("kernel", [False, True])
def test_modes_newton_cannot_reach_from_the_last_points_fail_there_and_start_again(kernel, monkeypatch):
    """After a point of SD 0.016 the modes u = b/0.016 are far off for an SD of 1.2: Newton from there falls by
    about 1 in η a step and had not reached the modes after its 100 steps, and the log-likelihood there came back
    as −8e25 for −2174.  Now such a start fails the point's evaluation and the modes start again (from zero):
    the value is the one of an engine evaluated at that point alone, to 1e-9."""
    if kernel:
        pytest.importorskip("numba")
    monkeypatch.setattr(fused, "MIN_ROWS", 0 if kernel else 10**12)
    rng = np.random.default_rng(2)
    G, r = 12, 100
    g = np.repeat(np.arange(G), r)
    x = rng.normal(size=G * r)
    eta = 0.5 + 0.5 * x + rng.normal(0, 2.5, G)[g]
    d = make_design(np.c_[np.ones(G * r), x], np.ones((G * r, 1)), rng.poisson(np.exp(eta)), g)
    fam = get_family("poisson")
    walked, fresh = GLMMLikelihood(d, fam, 1), GLMMLikelihood(d, fam, 1)
    assert fused.usable(walked) == kernel
    walked.evaluate(np.array([3.3, 0.5, 0.016]))
    far = np.array([3.3, 0.5, 1.2])
    assert np.max(np.abs(walked.u)) > 100            # the modes' start for the next point: far off
    got, want = walked.evaluate(far), fresh.evaluate(far)
    assert np.isfinite(want.value)
    assert abs(got.value - want.value) <= 1e-9 * abs(want.value), (got.value, want.value)
    assert np.allclose(got.grad, want.grad, rtol=1e-7, atol=1e-7)
