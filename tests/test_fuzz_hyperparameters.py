"""Property-based tests: any hyperparameter value either works or raises a clear ValueError.

Hypothesis draws each numeric hyperparameter from finite, infinite and NaN floats, ints,
booleans, strings and None. Constructing `KFAC` must then either succeed or raise a
`ValueError` that names the argument (never a `TypeError` or a crash deep inside
TensorFlow); an optimizer that constructs must train a step to finite weights and state.
The number of examples is fixed so that the run time is bounded.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_kfac

NUMERIC = ["learning_rate", "momentum", "damping", "l2_reg", "kl_clip", "factor_decay",
           "min_damping", "max_damping", "quadratic_model_fraction"]
INTERVALS = ["factor_update_interval", "inverse_update_interval",
             "damping_adaptation_interval", "gamma_adaptation_interval"]

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-10, max_value=10**6),
    st.booleans(),
    st.sampled_from(["0.1", "", None, [0.1], {"value": 1}]),
)
CONSTRUCTED: list[int] = [0, 0]  # [tried, constructed]


def _construct(name, value):
    CONSTRUCTED[0] += 1
    try:
        opt = tf_kfac.KFAC(**{name: value})
    except ValueError as error:
        assert f"`{name}`" in str(error) or name in str(error), str(error)
        return None
    CONSTRUCTED[1] += 1
    return opt


@settings(max_examples=300, deadline=None, derandomize=True)
@given(name=st.sampled_from(NUMERIC + INTERVALS), value=VALUES)
def test_any_value_constructs_or_raises_a_value_error_naming_it(name, value):
    opt = _construct(name, value)
    if opt is None:
        return
    stored = getattr(opt, name) if name != "learning_rate" else float(opt.learning_rate)
    if isinstance(stored, float):
        assert math.isfinite(stored)


def _train_one_step(opt):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss="mse", run_eagerly=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    model.fit(x, x[:, :2], batch_size=4, epochs=1, verbose=0)
    for weight in model.get_weights():
        assert np.all(np.isfinite(weight))
    for variable in opt.variables:
        assert np.all(np.isfinite(np.asarray(variable.numpy(), np.float64)))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NUMERIC),
       value=st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False),
       adaptive=st.booleans())
def test_a_constructed_optimizer_trains_to_finite_state(name, value, adaptive):
    try:
        opt = tf_kfac.KFAC(seed=0, adaptive=adaptive, **{name: value})
    except ValueError:
        return
    _train_one_step(opt)


def test_the_fuzzing_ran():
    """Reports how many draws were tried and constructed, as a warning in pytest's summary
    (which also reaches it from a pytest-xdist worker)."""
    if CONSTRUCTED[0] == 0:
        pytest.skip("run together with the property tests above")
    warnings.warn(f"hyperparameter draws: {CONSTRUCTED[0]} tried, {CONSTRUCTED[1]} "
                  f"constructed, {CONSTRUCTED[0] - CONSTRUCTED[1]} refused with a ValueError",
                  stacklevel=1)
