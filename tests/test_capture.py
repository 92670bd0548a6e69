"""Captured layer inputs and pre-activation gradients (docs/design.md §6, oracle 1).

With fisher="empirical" and factor_decay=0, a layer's factors are plain functions
of what K-FAC captured in the training step: A = (1/B) Σ āāᵀ over its inputs (or
patches) with a trailing 1, and G = (B/(c·|T|)) Σ ĝĝᵀ with ĝ = ∂h/∂s the gradient of
the mean loss h at the pre-activation s. Both are recomputed here from a hand-written
float64 forward pass under `tf.GradientTape`, for every way of writing a Keras model.
The capture module itself is then tested directly.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import capture

INPUT_SHAPE = (5, 5, 2)
KERNEL = 3  # valid padding, stride 1: a 3×3 grid of output positions
BATCH, OUTPUTS = 4, 3
TOL = 1e-4


# ----------------------------------------------------------------- the four models

def _layers():
    return (keras.layers.Conv2D(3, KERNEL, activation="tanh"), keras.layers.Flatten(),
            keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(OUTPUTS))


class WithTrainingArg(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv, self.flatten, self.hidden, self.head = _layers()

    def call(self, x, training=None):
        return self.head(self.hidden(self.flatten(self.conv(x, training=training))))


class WithoutTrainingArg(keras.Model):
    """`call(self, x)`: Keras and K-FAC must not pass `training` to it."""

    def __init__(self):
        super().__init__()
        self.conv, self.flatten, self.hidden, self.head = _layers()

    def call(self, x):
        return self.head(self.hidden(self.flatten(self.conv(x))))


def build_model(kind: str):
    """(model, (conv, hidden, head)) for a Sequential, functional or subclassed model."""
    if kind.startswith("subclassed"):
        model = WithTrainingArg() if kind == "subclassed" else WithoutTrainingArg()
        return model, (model.conv, model.hidden, model.head)
    conv, flatten, hidden, head = _layers()
    if kind == "sequential":
        model = keras.Sequential([keras.Input(INPUT_SHAPE), conv, flatten, hidden, head])
    else:
        inputs = keras.Input(INPUT_SHAPE)
        model = keras.Model(inputs, head(hidden(flatten(conv(inputs)))))
    return model, (conv, hidden, head)


# ------------------------------------------------------------------- the reference

def patches(x: np.ndarray, size: int) -> np.ndarray:
    """(B, positions, size·size·C) valid stride-1 patches, in kernel.reshape order."""
    batch, height, width, _ = x.shape
    return np.stack([x[:, i:i + size, j:j + size, :].reshape(batch, -1)
                     for i in range(height - size + 1) for j in range(width - size + 1)],
                    axis=1)


def with_ones(rows):
    return np.concatenate([rows, np.ones_like(rows[..., :1])], axis=-1)


def wbar(layer) -> tf.Variable:
    kernel = layer.kernel.numpy().astype(np.float64)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    return tf.Variable(np.concatenate([kernel, layer.bias.numpy()[None].astype(np.float64)]))


def reference_factors(layers, x, y):
    """[(A, G)] for conv, hidden and head from a hand-written tape (mse, c = 1/d)."""
    conv, hidden, head = (wbar(layer) for layer in layers)
    conv_rows = with_ones(patches(x.astype(np.float64), KERNEL))  # (B, T, D+1)
    with tf.GradientTape() as tape:
        s1 = conv_rows @ conv  # (B, T, filters)
        a1 = tf.reshape(tf.tanh(s1), (BATCH, -1))  # = Flatten of (B, 3, 3, filters)
        s2 = a1 @ hidden[:-1] + hidden[-1]
        a2 = tf.tanh(s2)
        s3 = a2 @ head[:-1] + head[-1]
        h = tf.reduce_mean(tf.square(tf.constant(y, tf.float64) - s3))
    g1, g2, g3 = (g.numpy() for g in tape.gradient(h, [s1, s2, s3]))
    c, positions = 1.0 / OUTPUTS, conv_rows.shape[1]
    out = []
    for rows, grads, t in ((conv_rows, g1, positions), (with_ones(a1.numpy()), g2, 1),
                           (with_ones(a2.numpy()), g3, 1)):
        rows, grads = rows.reshape(-1, rows.shape[-1]), grads.reshape(-1, grads.shape[-1])
        out.append((rows.T @ rows / BATCH, grads.T @ grads * BATCH / (c * t)))
    return out


def check_captured_statistics(kind, driver, rng, rel_err, build_first):
    model, layers = build_model(kind)
    x = rng.normal(size=(BATCH, *INPUT_SHAPE)).astype("float32")
    y = rng.normal(size=(BATCH, OUTPUTS)).astype("float32")
    if build_first:
        model(x)
    opt = tf_kfac.KFAC(learning_rate=1e-12, momentum=0.0, damping=1.0, kl_clip=None,
                       fisher="empirical", factor_decay=0.0)
    if driver == "fit":
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    else:
        opt.attach(model, loss="mse")
        opt.step(x, y)
    for layer, (a_ref, g_ref) in zip(layers, reference_factors(layers, x, y), strict=True):
        a, g = opt.kronecker_factors(layer)
        assert rel_err(a, a_ref) < TOL, layer.name
        assert rel_err(g, g_ref) < TOL, layer.name


@pytest.mark.parametrize("driver", ["fit", "step"])
@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed",
                                  "subclassed-no-training-arg"])
def test_captured_statistics_equal_hand_written_tape(kind, driver, rng, rel_err):
    """Conv2D and Dense inputs and pre-activation gradients are captured exactly.

    For each model style, through `model.fit` and through `attach` + `step`, the
    empirical factors after one step equal those built from a hand-written forward
    pass (numpy patches, explicit matmuls) and `tape.gradient(h, [s1, s2, s3])`.
    A negligible learning rate keeps the weights where the step measured them.
    """
    check_captured_statistics(kind, driver, rng, rel_err, build_first=True)


@pytest.mark.parametrize(("kind", "driver"), [("subclassed", "step"),
                                              ("subclassed-no-training-arg", "fit")])
def test_unbuilt_subclassed_model_is_captured_exactly(kind, driver, rng, rel_err):
    """The same, for a subclassed model never called before training (Keras builds it
    on the first call, inside the K-FAC step): one call per layer is captured."""
    check_captured_statistics(kind, driver, rng, rel_err, build_first=False)


# ------------------------------------------------------------ the capture module

def make_layer(kind: str, x):
    if kind == "dense":
        layer = keras.layers.Dense(4, activation="tanh")
    else:
        layer = keras.layers.Conv2D(3, KERNEL, activation="relu")
    layer(x)  # build
    return layer


def preactivation_by_hand(kind, layer, x) -> np.ndarray:
    kernel = layer.kernel.numpy().astype(np.float64)
    bias = layer.bias.numpy().astype(np.float64)
    x = x.astype(np.float64)
    if kind == "dense":
        return x @ kernel + bias
    rows = patches(x, KERNEL) @ kernel.reshape(-1, kernel.shape[-1]) + bias
    side = INPUT_SHAPE[0] - KERNEL + 1
    return rows.reshape(x.shape[0], side, side, -1)


INPUTS = {"dense": (BATCH, 6), "conv2d": (BATCH, *INPUT_SHAPE)}


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_recording_holds_input_preactivation_and_its_gradient(kind, rng):
    """Inside `recording`, a wrapped layer records its input and pre-activation s.

    s equals the hand-computed x·K + b (patches for Conv2D), the layer still returns
    activation(s), and s lies on the gradient path: ∂Σout/∂s = activation'(s).
    """
    x = rng.normal(size=INPUTS[kind]).astype("float32")
    layer = make_layer(kind, x)
    capture.wrap_layer(layer)
    with tf.GradientTape() as tape, capture.recording([layer]) as rec:
        out = layer(x)
        total = tf.reduce_sum(out)
    (call,) = rec.of(layer)
    expected = preactivation_by_hand(kind, layer, x)
    np.testing.assert_array_equal(call.inputs, x)
    np.testing.assert_allclose(call.preactivation, expected, rtol=1e-5, atol=1e-5)
    if kind == "dense":
        activated, derivative, name = np.tanh(expected), 1 - np.tanh(expected) ** 2, "tanh"
    else:
        activated, derivative, name = np.maximum(expected, 0), (expected > 0) * 1.0, "relu"
    np.testing.assert_allclose(out, activated, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(call.output, out)
    assert call.activation_name == name
    grad = tape.gradient(total, call.preactivation)
    np.testing.assert_allclose(grad, derivative, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_wrapped_layer_outside_recording_is_the_original_layer(kind, rng):
    """Outside a recording of it, a wrapped layer computes bit for bit what it did.

    Compared with an unwrapped twin holding the same weights: with no recording,
    inside a recording of another layer (which records nothing of it), and after
    `unwrap_layer`. Its activation attribute survives a recording untouched.
    """
    x = rng.normal(size=INPUTS[kind]).astype("float32")
    layer, twin = make_layer(kind, x), make_layer(kind, x)
    twin.set_weights(layer.get_weights())
    activation = layer.activation
    expected = twin(x).numpy()

    capture.wrap_layer(layer)
    assert capture.is_wrapped(layer) and not capture.is_wrapped(twin)
    np.testing.assert_array_equal(layer(x), expected)
    with capture.recording([twin]) as rec:
        np.testing.assert_array_equal(layer(x), expected)
    assert not rec.records(layer)
    with capture.recording([layer]):
        layer(x)
    assert layer.activation is activation
    np.testing.assert_array_equal(layer(x), expected)

    capture.unwrap_layer(layer)
    assert not capture.is_wrapped(layer) and "call" not in vars(layer)
    np.testing.assert_array_equal(layer(x), expected)


def test_recordings_nest_and_restore():
    """A nested recording is active only inside its block; the outer one returns after."""
    assert capture.active_recording() is None
    with capture.recording([]) as outer:
        with capture.recording([]) as inner:
            assert capture.active_recording() is inner
        assert capture.active_recording() is outer
    assert capture.active_recording() is None


@pytest.mark.parametrize("kind", ["sequential", "subclassed-no-training-arg"])
def test_predict_and_evaluate_are_unaffected(kind, rng):
    """K-FAC's wrapping leaves inference alone: `predict` is bit-identical after
    `attach`, and after a training step `predict` and `evaluate` equal those of a
    never-wrapped twin model holding the trained weights."""
    model, _ = build_model(kind)
    x = rng.normal(size=(BATCH, *INPUT_SHAPE)).astype("float32")
    y = rng.normal(size=(BATCH, OUTPUTS)).astype("float32")
    before = model.predict(x, verbose=0)
    opt = tf_kfac.KFAC(learning_rate=0.05)
    model.compile(optimizer=opt, loss="mse")
    opt.attach(model)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)

    model.fit(x, y, batch_size=BATCH, verbose=0)
    twin, _ = build_model(kind)
    twin(x)
    twin.set_weights(model.get_weights())
    twin.compile(optimizer="sgd", loss="mse")
    after = model.predict(x, verbose=0)
    assert not np.array_equal(after, before)  # the step did train
    np.testing.assert_array_equal(after, twin.predict(x, verbose=0))
    assert model.evaluate(x, y, verbose=0) == twin.evaluate(x, y, verbose=0)
