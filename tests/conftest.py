"""Shared test set-up: quiet TensorFlow, fixed seeds, float64 NumPy helpers.

Helpers that test files need as plain functions are handed out by fixtures
(`to64`, `rel_err`), so no test file imports from another.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so that MirroredStrategy runs two replicas on this
# machine (tests/test_distributed.py). This must happen before any op runs;
# everything else still runs on /cpu:0.
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

SEED = 1234


def _to64(value) -> np.ndarray:
    """Any tensor, variable or array as a float64 NumPy array."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def _rel_err(actual, desired) -> float:
    """‖actual − desired‖ / ‖desired‖ in float64 (Frobenius norm)."""
    actual, desired = _to64(actual), _to64(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    return float(np.linalg.norm(actual - desired) / max(np.linalg.norm(desired), 1e-300))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same Python, NumPy, TensorFlow and Keras seeds."""
    keras.utils.set_random_seed(SEED)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy generator with a fixed seed, for test data."""
    return np.random.default_rng(SEED)


@pytest.fixture
def to64():
    """`to64(x)`: a tensor, variable or array as a float64 NumPy array."""
    return _to64


@pytest.fixture
def rel_err():
    """`rel_err(actual, desired)`: relative Frobenius error in float64."""
    return _rel_err


@pytest.fixture(scope="session")
def mirrored():
    """The one MirroredStrategy over the two logical CPUs that runs collectives in the tests.

    TensorFlow numbers collective operations per strategy object from the same
    start, so two strategies over the same devices in one process can collide
    in its collective cache (a "shape mismatch in the collective instance"):
    every test that trains on two replicas takes this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
