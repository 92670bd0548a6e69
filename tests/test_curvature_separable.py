"""SeparableConv2D's two blocks against explicit loops (docs/design.md §6, oracle 5).

The references use TensorFlow's own depthwise convolution and hand-written float64
arithmetic, never tf_kfac: the depthwise part's per-channel factors come from a loop
over channels and patches, the pointwise part's from the depthwise output at every
position, with empirical gradients (B/c)·∂h/∂(·) taken through a hand-written forward
pass.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

TOL = 1e-4


def _patches(x, k):
    """(B, H, W, C, k·k) "same"-padded stride-1 patches of each channel, by a loop."""
    batch, height, width, channels = x.shape
    pad = k // 2
    padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    out = np.zeros((batch, height, width, channels, k * k))
    for i in range(height):
        for j in range(width):
            window = padded[:, i:i + k, j:j + k, :]  # (B, k, k, C)
            out[:, i, j] = window.reshape(batch, k * k, channels).transpose(0, 2, 1)
    return out


@pytest.mark.parametrize("multiplier", [1, 2])
def test_separable_conv2d_factors_equal_loops(multiplier, rng, rel_err):
    """Depthwise A_c, G_c and pointwise A, G of a SeparableConv2D equal explicit loops.

    Depthwise, per channel c (its bias is the pointwise part's): A_c = (1/B) ΣᵢΣₜ ppᵀ
    over its patches, G_c =
    c·(1/B)Σᵢ(1/T)Σₜ ggᵀ over its m outputs at the depthwise output; pointwise: A =
    (1/B)ΣᵢΣₜ [u; 1][u; 1]ᵀ over the depthwise output u, G likewise at the
    pre-activation. A wrong patch order, channel index (c·m + j), position scale or
    a gradient taken at the wrong tensor fails it.
    """
    batch, size, channels, filters, k = 3, 5, 2, 3, 3
    x = rng.normal(size=(batch, size, size, channels)).astype("float32")
    y = rng.normal(size=(batch, filters)).astype("float32")
    layer = keras.layers.SeparableConv2D(filters, k, padding="same", activation="tanh",
                                         depth_multiplier=multiplier,
                                         bias_initializer="random_normal")
    model = keras.Sequential([keras.Input(x.shape[1:]), layer,
                              keras.layers.GlobalAveragePooling2D()])
    depthwise = np.asarray(layer.depthwise_kernel.numpy(), np.float64)
    pointwise = np.asarray(layer.pointwise_kernel.numpy(), np.float64)[0, 0]
    bias = np.asarray(layer.bias.numpy(), np.float64)

    patches = _patches(x.astype(np.float64), k)  # (B, H, W, C, k·k)
    kernel = depthwise.reshape(k * k, channels, multiplier)
    middle = tf.Variable(np.einsum("bhwcp,pcm->bhwcm", patches, kernel)
                         .reshape(batch, size, size, channels * multiplier))
    with tf.GradientTape(persistent=True) as tape:
        s = tf.einsum("bhwi,io->bhwo", middle, pointwise) + bias
        tape.watch(s)
        out = tf.reduce_mean(tf.tanh(s), axis=[1, 2])
        h = tf.reduce_mean(keras.losses.mean_squared_error(tf.constant(y, tf.float64), out))
    np.testing.assert_allclose(out.numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
    g_middle, g_s = tape.gradient(h, [middle, s])
    c, positions = 1.0 / filters, size * size
    scale = batch / c

    a_dw = np.einsum("bhwci,bhwcj->cij", patches, patches) / batch  # no bias here
    g_rows = (scale * g_middle.numpy()).reshape(batch, positions, channels, multiplier)
    g_dw = c * np.einsum("btci,btcj->cij", g_rows, g_rows) / (batch * positions)
    u = np.concatenate([middle.numpy().reshape(-1, channels * multiplier),
                        np.ones((batch * positions, 1))], axis=1)
    a_pw = u.T @ u / batch
    g_flat = (scale * g_s.numpy()).reshape(-1, filters)
    g_pw = c * g_flat.T @ g_flat / (batch * positions)

    opt = tf_kfac.KFAC(fisher="empirical", seed=0, learning_rate=1e-3, momentum=0.0,
                       kl_clip=None, factor_decay=0.0)
    opt.attach(model, loss=keras.losses.MeanSquaredError())
    logs = opt.step(x, y)
    assert float(logs["loss"]) == pytest.approx(float(h), rel=1e-5)
    (a1, g1), (a2, g2) = opt.kronecker_factors(layer)
    assert rel_err(a1, a_dw) < TOL
    assert rel_err(g1, g_dw) < TOL
    assert rel_err(a2, a_pw) < TOL
    assert rel_err(g2, g_pw) < TOL


def test_separable_conv2d_trains_in_fit_and_predicts_unchanged(rng):
    """`fit` (a compiled graph) trains a SeparableConv2D model with finite state, and
    `predict` afterwards runs the layer's own call: it equals a plain call.

    This also guards a TF graph defect met here: symmetrising a batch of 1×1 G
    factors (depth_multiplier=1) inside the refresh made the step return empty
    outputs, and `fit` then failed in the data iterator.
    """
    x = rng.normal(size=(16, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.SeparableConv2D(4, 3, activation="relu"),
        keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
    opt = tf_kfac.KFAC(seed=0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables)
    text = opt.summary(print_fn=lambda _: None)
    assert "first-order" not in text and "separable_conv" in text
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x).numpy(), rtol=1e-5,
                               atol=1e-6)
