"""Samplers of `deco.reference` (spec/04-sampling.md) against closed forms and hand computations.

The main oracle is a Gaussian data distribution, whose flow-matching velocity and ODE flow are
known exactly (derived in `GaussianFlow`), so Euler and Heun must converge to the analytic answer at
their textbook orders.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import cases
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.reference.sampling import adams, adams_weights, euler

NUM_CLASSES = 3


class GaussianFlow:
    """Exact flow-matching velocity for data x ~ N(mu_y, sigma^2 I) given class y.

    With x_t = t x + (1 - t) eps, eps ~ N(0, I) independent of x, the trained model's optimum is
    v(x_t, t) = E[x - eps | x_t]. (x, eps, x_t) are jointly Gaussian with
      E[x_t] = t mu,  Var(x_t) = t^2 sigma^2 + (1 - t)^2 =: s(t)^2   (per coordinate),
      Cov(x, x_t) = t sigma^2,  Cov(eps, x_t) = 1 - t,
    so E[x | x_t] = mu + t sigma^2 / s^2 (x_t - t mu) and E[eps | x_t] = (1 - t) / s^2 (x_t - t mu):
      v(x_t, t) = mu + (t sigma^2 - (1 - t)) / s(t)^2 * (x_t - t mu).
    Since d s / d t = (t sigma^2 - (1 - t)) / s, this is v = mu + (s'/s)(x_t - t mu), whose solution
    from x_0 = eps is x_t = t mu + s(t) eps (check: d/dt = mu + s' eps = mu + (s'/s)(x_t - t mu)).
    At t = 1, s(1) = sigma: the exact ODE maps noise eps to mu + sigma eps.

    The null class (label NUM_CLASSES) gets `null_velocity` (default: the same law with mean 0).
    """

    def __init__(self, mu: np.ndarray, sigma: float,
                 null_velocity: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
        self.mu = mu  # (NUM_CLASSES + 1, C, H, W); row NUM_CLASSES used for the null class
        self.sigma = sigma
        self.null_velocity = null_velocity
        self.config = SimpleNamespace(num_classes=NUM_CLASSES)
        self.calls: list[int] = []  # batch size of every forward call

    def exact(self, eps: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.mu[labels] + self.sigma * eps

    def velocity(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
        mu = self.mu[y]
        s2 = t**2 * self.sigma**2 + (1 - t) ** 2
        return mu + (t * self.sigma**2 - (1 - t)) / s2 * (x - t * mu)

    def forward(self, x: Any, t: Any, y: Any) -> np.ndarray:
        x, t, y = np.asarray(x), np.asarray(t), np.asarray(y)
        self.calls.append(x.shape[0])
        out = self.velocity(x, t, y)
        if self.null_velocity is not None:
            null = y == NUM_CLASSES
            out[null] = self.null_velocity(x[null], t[null])
        return out


def _setup(seed: int = 0, sigma: float = 0.5) -> tuple[GaussianFlow, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((NUM_CLASSES + 1, 3, 4, 4))
    model = GaussianFlow(mu, sigma)
    noise = rng.standard_normal((2, 3, 4, 4))
    labels = np.array([0, 2])
    return model, noise, labels


def _errors(solver: str, steps: list[int], exact_heun: bool = False, timeshift: float = 1.0) -> np.ndarray:
    model, noise, labels = _setup()
    target = model.exact(noise, labels)
    return np.array([
        np.max(np.abs(R.sample(model, noise, labels, steps=n, solver=solver, exact_heun=exact_heun,
                               timeshift=timeshift) - target))
        for n in steps
    ])


@pytest.mark.parametrize("timeshift", [1.0, 3.0])
def test_euler_converges_at_first_order(timeshift: float) -> None:
    steps = [16, 32, 64, 128]
    err = _errors("euler", steps, timeshift=timeshift)
    assert np.all(np.diff(err) < 0)
    orders = np.log2(err[:-1] / err[1:])
    # error halves with the step: the limit is the analytic answer, not merely some fixed point
    assert np.all((orders > 0.8) & (orders < 1.3)), orders


@pytest.mark.parametrize("timeshift", [1.0, 3.0])
def test_exact_heun_converges_at_second_order(timeshift: float) -> None:
    steps = [8, 16, 32, 64]
    err = _errors("heun", steps, exact_heun=True, timeshift=timeshift)
    assert np.all(np.diff(err) < 0)
    orders = np.log2(err[:-1] / err[1:])
    assert np.all((orders > 1.7) & (orders < 2.5)), orders


def test_reuse_heun_converges() -> None:
    # Reusing the corrector velocity (evaluated at x_hat_i instead of x_i, an O(h^2) difference)
    # keeps second order on this smooth field; assert at least clearly better than first order.
    err = _errors("heun", [8, 16, 32, 64], exact_heun=False)
    assert np.all(np.diff(err) < 0)
    orders = np.log2(err[:-1] / err[1:])
    assert np.all(orders > 1.5), orders
    assert err[-1] < _errors("euler", [64])[0]


def test_guidance_one_is_the_conditional_branch() -> None:
    model, noise, labels = _setup(1)
    model.null_velocity = lambda x, t: -3.0 * x + 1.0  # very different from the conditional law
    plain, _, _ = _setup(1)  # the same conditional law; its null branch is never seen by Euler below
    for solver in ("euler", "heun"):
        got = R.sample(model, noise, labels, steps=5, guidance=1.0, solver=solver)
        ref = R.sample(plain, noise, labels, steps=5, guidance=1.0, solver=solver)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # and by hand: Euler on the conditional velocity alone
    grid = np.linspace(0, 1, 6)
    x = noise
    for t0, t1 in itertools.pairwise(grid):
        x = x + (t1 - t0) * model.velocity(x, np.full(2, t0), labels)
    np.testing.assert_allclose(R.sample(model, noise, labels, steps=5, guidance=1.0), x, rtol=1e-12,
                               atol=1e-12)


def _branches(seed: int) -> tuple[GaussianFlow, np.ndarray, np.ndarray,
                                  Callable[[np.ndarray, float], np.ndarray],
                                  Callable[[np.ndarray, float], np.ndarray]]:
    model, noise, labels = _setup(seed)
    model.null_velocity = lambda x, t: 0.7 * x - t.reshape(-1, 1, 1, 1)
    def cond(x: np.ndarray, t: float) -> np.ndarray:
        return model.velocity(x, np.full(len(x), t), labels)
    def null(x: np.ndarray, t: float) -> np.ndarray:
        return 0.7 * x - t
    return model, noise, labels, cond, null


@pytest.mark.parametrize(("low", "high"), [(0.25, 0.75), (0.0, 1.0), (0.1, 0.5), (0.5, 0.5)])
def test_guidance_interval_euler_trajectory(low: float, high: float) -> None:
    model, noise, labels, cond, null = _branches(2)
    g, steps = 2.5, 4  # grid 0, 0.25, 0.5, 0.75, 1: hits the interval's ends exactly
    grid = R.time_grid(steps)
    expected = [noise]
    x = noise
    for i in range(steps):
        t = i / steps
        c, u = cond(x, t), null(x, t)
        v = u + g * (c - u) if low < t <= high else c  # guidance only where low < t <= high
        x = x + (1 / steps) * v
        expected.append(x)
    traj: list[np.ndarray] = []
    out = euler(model, noise, labels, grid, g, (low, high), traj)
    assert len(traj) == steps + 1
    for got, exp in zip(traj, expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, expected[-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R.sample(model, noise, labels, steps=steps, guidance=g, interval=(low, high)),
                               expected[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("low", "high"), [(0.3, 0.7), (0.0, 1.0)])
def test_heun_by_hand(exact: bool, low: float, high: float) -> None:
    # Heun with a plain Euler last step; both evaluations of step i use the scale at t_i; the
    # non-exact variant reuses the corrector's velocity as the next predictor velocity.
    model, noise, labels, cond, null = _branches(3)
    g, steps, shift = 3.0, 5, 2.0
    grid = [(i / steps) / ((i / steps) + (1 - i / steps) * shift) for i in range(steps + 1)]

    def v(x: np.ndarray, t: float, scale: float) -> np.ndarray:
        c, u = cond(x, t), null(x, t)
        return u + scale * (c - u)

    x, reuse = noise, None
    for i in range(steps):
        t0, t1 = grid[i], grid[i + 1]
        scale = g if low < t0 <= high else 1.0
        v0 = v(x, t0, scale) if exact or reuse is None else reuse
        x_hat = x + (t1 - t0) * v0
        if i == steps - 1:
            x = x_hat
            break
        v1 = v(x_hat, t1, scale)
        x = x + (t1 - t0) * 0.5 * (v0 + v1)
        reuse = v1
    got = R.sample(model, noise, labels, steps=steps, guidance=g, interval=(low, high), timeshift=shift,
                   solver="heun", exact_heun=exact)
    np.testing.assert_allclose(got, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_model_call_counts(steps: int) -> None:
    for solver, exact, expected in [("euler", False, steps), ("heun", True, 2 * steps - 1),
                                    ("heun", False, steps)]:
        model, noise, labels = _setup()
        R.sample(model, noise, labels, steps=steps, guidance=2.0, solver=solver, exact_heun=exact)
        assert len(model.calls) == expected, (solver, exact)
        assert model.calls == [2 * len(labels)] * expected  # CFG: one batched call [null; cond]


# ------------------------------------------------------------------------------------ Adams
class LinearODE:
    """dx/dt = cos(3t) x + t, whatever the label: a time-dependent linear ODE whose solution at
    t = 1 comes from SciPy's DOP853 at tolerance 1e-13 (the oracle)."""

    config = SimpleNamespace(num_classes=NUM_CLASSES)

    def forward(self, x: Any, t: Any, y: Any) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
        return np.cos(3 * t) * np.asarray(x) + t

    @staticmethod
    def exact(x0: np.ndarray) -> np.ndarray:
        from scipy.integrate import solve_ivp

        sol = solve_ivp(lambda t, x: np.cos(3 * t) * x + t, (0.0, 1.0), x0.ravel(), method="DOP853",
                        rtol=1e-13, atol=1e-13)
        return np.asarray(sol.y[:, -1]).reshape(x0.shape)


@pytest.mark.parametrize("timeshift", [1.0, 3.0])
def test_adams_converges_at_second_order(timeshift: float) -> None:
    # Two-step Adams-Bashforth (its first step is Euler, a single O(h^2) local error) is second
    # order overall: the error against the ODE's solution quarters when the step halves.
    model, noise, labels = LinearODE(), _setup()[1], np.array([0, 1])
    target = LinearODE.exact(noise)
    err = np.array([np.max(np.abs(R.sample(model, noise, labels, steps=n, solver="adams",
                                           timeshift=timeshift) - target)) for n in (16, 32, 64, 128)])
    orders = np.log2(err[:-1] / err[1:])
    assert np.all((orders > 1.7) & (orders < 2.3)), orders
    # order 1 is Euler exactly
    np.testing.assert_allclose(R.sample(model, noise, labels, steps=7, solver="adams", order=1,
                                        timeshift=timeshift),
                               R.sample(model, noise, labels, steps=7, timeshift=timeshift),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(gaps=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=8), order=st.integers(1, 4))
def test_adams_weights_integrate_polynomials_exactly(gaps: list[float], order: int) -> None:
    grid = np.concatenate([[0.0], np.cumsum(gaps)])
    weights = adams_weights(grid, order)
    assert len(weights) == len(gaps)
    for i, w in enumerate(weights):
        k = min(order, i + 1)
        nodes, a, b = grid[i + 1 - k: i + 1], grid[i], grid[i + 1]
        assert w.shape == (k,)
        # times the step, the weights integrate every polynomial of degree < k over [a, b]
        # exactly (degree 0: they sum to 1, i.e. to the step after multiplying)
        for m in range(k):
            np.testing.assert_allclose((b - a) * np.sum(w * nodes**m), (b**(m + 1) - a**(m + 1)) / (m + 1),
                                       rtol=1e-9, atol=1e-12)


def test_adams_weights_order_two_closed_form() -> None:
    # nodes t_{i-1}, t_i, step h to t_{i+1} after a gap g: weights (-h/(2g), 1 + h/(2g))
    grid = np.array([0.0, 0.1, 0.35, 0.5, 1.0])
    weights = adams_weights(grid, 2)
    np.testing.assert_array_equal(weights[0], [1.0])
    for i in range(1, 4):
        g, h = grid[i] - grid[i - 1], grid[i + 1] - grid[i]
        np.testing.assert_allclose(weights[i], [-h / (2 * g), 1 + h / (2 * g)], rtol=1e-13)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.25, 0.75), (0.0, 0.5)])
def test_adams_by_hand(low: float, high: float) -> None:
    # Two-step Adams over guided velocities; guidance only where low < t < high (strict at BOTH
    # ends, unlike Euler/Heun): on the grid 0, 0.25, 0.5, 0.75 with (0, 1) the step at t = 0 is
    # unguided; with (0.25, 0.75) only t = 0.5 is guided.
    model, noise, labels, cond, null = _branches(4)
    g, steps = 2.5, 4
    x, history, expected = noise, [], [noise]
    for i in range(steps):
        t = i / steps
        c, u = cond(x, t), null(x, t)
        history.append(u + g * (c - u) if low < t < high else c)
        v = history[-1] if i == 0 else -0.5 * history[-2] + 1.5 * history[-1]  # uniform steps
        x = x + v / steps
        expected.append(x)
    traj: list[np.ndarray] = []
    out = adams(model, noise, labels, R.time_grid(steps), g, (low, high), 2, traj)
    for got, exp in zip(traj, expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R.sample(model, noise, labels, steps=steps, guidance=g, interval=(low, high),
                                        solver="adams"), out, rtol=1e-12, atol=1e-12)


def test_adams_calls_and_null_labels() -> None:
    model, noise, labels = _setup()
    R.sample(model, noise, labels, steps=5, guidance=2.0, solver="adams")
    assert model.calls == [2 * len(labels)] * 5  # one batched [null; cond] call per step
    # an explicit null equal to the null class is the default
    default = R.sample(model, noise, labels, steps=3, guidance=2.0, solver="adams")
    explicit = R.sample(model, noise, labels, np.full(2, NUM_CLASSES), steps=3, guidance=2.0,
                        solver="adams")
    np.testing.assert_array_equal(default, explicit)


# ------------------------------------------------------------------------------------ time grid
@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 60), shift=st.floats(0.1, 10.0))
def test_time_grid(steps: int, shift: float) -> None:
    grid = R.time_grid(steps, shift)
    assert grid.shape == (steps + 1,)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert np.all(np.diff(grid) > 0)
    u = np.arange(steps + 1) / steps
    np.testing.assert_allclose(grid, u / (u + (1 - u) * shift), rtol=1e-14)
    np.testing.assert_allclose(R.time_grid(steps), u, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ bad input
MODEL, NOISE, LABELS = _setup()


def _sample(**kwargs: Any) -> Any:
    args: dict[str, Any] = {"noise": NOISE, "labels": LABELS, "steps": 2}
    args.update(kwargs)
    return R.sample(MODEL, args.pop("noise"), args.pop("labels"), **args)


BAD_INPUTS = [
    ("steps-zero", lambda: _sample(steps=0), ValueError, "steps"),
    ("steps-float", lambda: _sample(steps=2.0), TypeError, "steps"),
    ("solver", lambda: _sample(solver="rk4"), ValueError, "solver"),
    ("interval-order", lambda: _sample(interval=(0.8, 0.2)), ValueError, "interval"),
    ("interval-range", lambda: _sample(interval=(0.0, 1.5)), ValueError, "interval"),
    ("interval-nan", lambda: _sample(interval=(np.nan, 1.0)), ValueError, "interval"),
    ("guidance-nan", lambda: _sample(guidance=np.nan), ValueError, "guidance"),
    ("timeshift-zero", lambda: _sample(timeshift=0.0), ValueError, "timeshift"),
    ("noise-rank", lambda: _sample(noise=np.zeros((2, 3, 4))), ValueError, "noise"),
    ("noise-nan", lambda: _sample(noise=np.full((2, 3, 4, 4), np.nan)), ValueError, "noise"),
    ("labels-range", lambda: _sample(labels=np.array([0, NUM_CLASSES + 1])), ValueError, "labels"),
    ("labels-float", lambda: _sample(labels=np.array([0.0, 1.0])), TypeError, "labels"),
    ("labels-shape", lambda: _sample(labels=np.array([0])), ValueError, "labels"),
    ("time-grid-steps", lambda: R.time_grid(-1), ValueError, "steps"),
    ("adams-order", lambda: _sample(solver="adams", order=0), ValueError, "order"),
    ("adams-order-float", lambda: _sample(solver="adams", order=2.0), TypeError, "order"),
    ("null-range", lambda: _sample(null=np.array([0, NUM_CLASSES + 1])), ValueError, "null"),
    ("adams-weights-grid", lambda: adams_weights(np.array([0.0, 1.0, 0.5])), ValueError, "grid"),
]


@pytest.mark.parametrize(("call", "error", "name"), cases(BAD_INPUTS))
def test_sampling_bad_inputs(call: Callable[[], object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=rf"^{name}:"):
        call()
