"""K-FAC under tf.distribute: two replicas give the same run as one device.

MirroredStrategy on two logical CPU devices (set up in conftest.py), each
replica with half of the global batch, against one device with the whole
batch: weights, factors and inverses after several steps agree within float
tolerance, for the estimators that involve no random draws.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

DEVICES = ["/cpu:0", "/cpu:1"]


@pytest.fixture(scope="module")
def mirrored():
    """One MirroredStrategy for the whole module.

    TensorFlow numbers collective operations per strategy object from the same
    start, so two strategies over the same devices in one process can collide
    in its collective cache (a "shape mismatch in the collective instance").
    """
    return tf.distribute.MirroredStrategy(DEVICES)
GLOBAL_BATCH = 16
STEPS = 7


def _data(rng, n=GLOBAL_BATCH * STEPS, image=False):
    x = rng.normal(size=(n, 6, 6, 2) if image else (n, 10)).astype("float32")
    y = rng.integers(0, 4, size=(n,))
    return x, y


def _mlp():
    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(4, activation="softmax"),
    ])


def _convnet():
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(4),
    ])


def _train(build, strategy, weights, x, y, **kfac_args):
    scope = strategy.scope() if strategy is not None else _nullcontext()
    with scope:
        model = build()
        model.set_weights(weights)
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=model.layers[-1].activation is keras.activations.linear)
        optimizer = tf_kfac.KFAC(seed=3, **kfac_args)
        model.compile(optimizer=optimizer, loss=loss)
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model, optimizer, history


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _state(model, optimizer):
    out = {"weights": [w.numpy() for w in model.trainable_variables]}
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            a, g = optimizer.kronecker_factors(layer)
            out[f"layer {i} A"], out[f"layer {i} G"] = a.numpy(), g.numpy()
    return out


CASES = [
    pytest.param(_mlp, dict(fisher="exact"), id="mlp-exact-fixed"),
    pytest.param(_mlp, dict(fisher="empirical"), id="mlp-empirical-fixed"),
    pytest.param(_convnet, dict(fisher="exact"), id="conv-exact-fixed"),
    pytest.param(_mlp, dict(fisher="exact", adaptive=True), id="mlp-exact-adaptive"),
    pytest.param(_convnet, dict(fisher="empirical", adaptive=True), id="conv-empirical-adaptive"),
]


@pytest.mark.parametrize("build, kfac_args", CASES)
def test_two_replicas_equal_one_device_with_the_global_batch(
        build, kfac_args, mirrored, rng, rel_err):
    x, y = _data(rng, image=build is _convnet)
    weights = build().get_weights()
    args = dict(factor_update_interval=2, inverse_update_interval=3,
                damping_adaptation_interval=2, **kfac_args)
    one = _state(*_train(build, None, weights, x, y, **args)[:2])
    model, optimizer, _ = _train(build, mirrored, weights, x, y, **args)
    assert mirrored.num_replicas_in_sync == 2
    two = _state(model, optimizer)
    assert int(optimizer.iterations.numpy()) == STEPS
    for key in one:
        if key == "weights":
            for w1, w2 in zip(one[key], two[key], strict=True):
                assert rel_err(w2, w1) < 1e-4, key
        else:
            assert rel_err(two[key], one[key]) < 1e-4, key
    assert np.abs(np.concatenate([w.ravel() for w in one["weights"]])
                  - np.concatenate([w.ravel() for w in weights])).max() > 1e-3  # it trained
