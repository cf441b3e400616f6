"""The step for a coordinate F is even in (fedglmm.likelihood.boundary): where F is quadratic in the
coordinate's square u = x² and the others, that model is exact, so one step lands on the optimum -- on
u = 0 where the unconstrained minimum in u lies below 0, inside where it does not; and the trust-region
Newton iteration reaches a zero optimum in a couple of rounds where Newton in x would only halve x."""
import numpy as np
import pytest

from fedglmm.likelihood.boundary import boundary_step
from fedglmm.likelihood.newton import TrustRegionNewton, _newton_step
from fedglmm.model.options import NewtonConfig

A = np.array([[2.0, 0.7], [0.7, 1.5]])       # F's Hessian in (b, u)


def fgh(z, ustar):
    """F(b, x) = ½ [b − 1, x² − u*] A [b − 1, x² − u*]ᵀ, its gradient and Hessian in (b, x)."""
    b, x = z
    r = np.array([b - 1.0, x * x - ustar])
    Fb, Fu = A @ r
    g = np.array([Fb, 2.0 * x * Fu])
    H = np.array([[A[0, 0], 2.0 * x * A[0, 1]], [2.0 * x * A[0, 1], 4.0 * x * x * A[1, 1] + 2.0 * Fu]])
    return 0.5 * r @ A @ r, g, H


@pytest.mark.parametrize("ustar, start", [(-0.2, (0.5, 0.3)), (0.01, (1.3, 0.4)), (-0.05, (0.8, -0.25))])
def test_one_step_to_the_optimum_of_a_function_quadratic_in_the_square(ustar, start):
    z = np.array(start)
    f, g, H = fgh(z, ustar)
    newton = _newton_step(g, H)
    if ustar < 0:
        assert newton is not None and abs(z[1] + newton[1]) < 0.5 * abs(z[1])   # Newton in x shrinks x by half
    else:       # (Newton in x comes down from above here: the step is asked for as if it shrank x)
        newton = np.array([0.0, -0.9 * z[1]])
    step, pred = boundary_step(z, g, H, newton, (1,))
    u = max(ustar, 0.0)
    b = 1.0 - A[0, 1] / A[0, 0] * (u - ustar)            # b's optimum given u
    assert z[1] + step[1] == pytest.approx(np.sign(z[1]) * np.sqrt(u), abs=1e-12)
    assert z[0] + step[0] == pytest.approx(b, abs=1e-12)
    assert f - fgh(z + step, ustar)[0] == pytest.approx(pred, rel=1e-10)   # the model is exact
    # the model in x (the others at the quadratic model's minimum given x = 0) misses b
    if ustar < 0:
        bx = z[0] - (g[0] + H[0, 1] * (-z[1])) / H[0, 0]
        assert abs(bx - b) > 1e-3


def test_none_where_newton_does_not_shrink_the_coordinate():
    z = np.array([0.9, 0.5])
    f, g, H = fgh(z, 0.3)
    assert boundary_step(z, g, H, _newton_step(g, H), (1,)) is None
    assert boundary_step(z, g, H, _newton_step(g, H), ()) is None


def test_the_iteration_reaches_a_zero_optimum_in_few_rounds():
    """F even in x with its minimum at x = 0: the iteration lands there (x exactly 0) in a few rounds;
    without the coordinate declared even, Newton's halving takes many more."""
    def run(boundary):
        opt = TrustRegionNewton(np.array([0.2, 0.6]), NewtonConfig(tol=1e-12), boundary=boundary)
        xs = opt.starts
        while xs:
            xs = opt.tell(xs, [fgh(x, -0.1) for x in xs])
        return opt
    even, plain = run((1,)), run(())
    assert even.converged and even.solution[1] == 0.0
    assert even.solution[0] == pytest.approx(1.0 - A[0, 1] / A[0, 0] * 0.1, abs=1e-10)
    assert even.evals <= 4 < plain.evals


def test_face_step_where_the_curvature_turns_negative_along_a_zero_sd_alone():
    """H with one negative eigenvalue along an even coordinate at 1e-3 (x = (a, s), F even in s): the step
    puts s at 0 and a at the minimum of the model with half the coupling (the model in s²); with s at 0
    already, a alone to its minimum there (nothing where it is there too); nothing where the negative
    direction is not that coordinate's or H is positive definite; checked against the closed form."""
    from fedglmm.likelihood.boundary import face_step

    x, g = np.array([0.3, 1e-3]), np.array([0.2, -1e-4])
    H = np.array([[4.0, 0.5], [0.5, -0.9]])
    step, pred = face_step(x, g, H, (1,))
    sa = -(g[0] + 0.5 * H[0, 1] * -x[1]) / H[0, 0]
    assert np.allclose(step, [sa, -x[1]], rtol=1e-14, atol=0)
    assert np.isclose(pred, -(g @ step + 0.5 * step @ H @ step), rtol=1e-14)
    assert face_step(x, g, H, (0,)) is None                         # not a coordinate whose sign is free
    on, g0 = np.array([0.3, 0.0]), np.array([0.2, 0.0])             # at the zero already (F even there: g 0)
    step, pred = face_step(on, g0, H, (1,))
    assert np.allclose(step, [-0.2 / 4.0, 0.0], rtol=1e-14, atol=0) and np.isclose(pred, 0.2 ** 2 / 8.0, rtol=1e-14)
    assert face_step(on, np.zeros(2), H, (1,)) is None              # ... and a at its minimum there too
    assert face_step(x, g, np.array([[4.0, 0.5], [0.5, 0.9]]), (1,)) is None
    mixed = np.array([[1.0, 1.2], [1.2, 0.5]])                       # negative direction shared by both
    assert face_step(x, g, mixed, (1,)) is None


def test_face_decrement_where_the_negative_curvature_lies_along_a_zero_sd():
    """On the face of a zero SD (x = (a, b, s), s = 0 exactly, F even in s: g_s and H's cross terms in s are 0) with
    H's curvature negative along s alone, the decrement within the face is g_fᵀ H_f⁻¹ g_f over the other
    coordinates (closed form); ∞ where no coordinate of ``even`` is at 0, where the other coordinates' H is not
    positive definite, or where the zero is not one of ``even``'s."""
    from fedglmm.likelihood.boundary import face_decrement
    from fedglmm.likelihood.candidates import State

    x, g = np.array([0.3, -0.2, 0.0]), np.array([0.2, -0.1, 0.0])
    H = np.array([[4.0, 0.5, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, -0.9]])
    Hf = H[:2, :2]
    expected = float(g[:2] @ np.linalg.solve(Hf, g[:2]))
    assert face_decrement(State(x, 0.0, g, H), (2,)) == pytest.approx(expected, rel=1e-14)
    assert face_decrement(State(x, 0.0, g, H), (0,)) == np.inf          # the zero is not an even coordinate's
    assert face_decrement(State(np.array([0.3, -0.2, 0.1]), 0.0, g, H), (2,)) == np.inf     # not at 0
    bad = H.copy()
    bad[1, 1] = -2.0                                                    # negative curvature off the face too
    assert face_decrement(State(x, 0.0, g, bad), (2,)) == np.inf
