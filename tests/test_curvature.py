"""The Kronecker factors against brute-force curvature (docs/design.md §6, oracles 2, 3 and 5).

The references never go through tf_kfac: a hand-written float64 forward pass with the
model's weights, `tf.GradientTape` Jacobians, Hessians of Keras's own loss functions, and
explicit Python loops over convolution patches. The curvature is that of the objective
h = (1/B) Σᵢ ℓᵢ exactly as Keras computes it, over the row-major vec of W̄ = [K; b].
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac.blocks import KroneckerBlock

TOL = 1e-4  # relative error allowed between float32 factors and float64 references

ACTIVATIONS = {"linear": tf.identity, "tanh": tf.tanh, "sigmoid": tf.sigmoid,
               "softmax": tf.nn.softmax}


class LossCase(NamedTuple):
    make: object  # () -> the keras.losses.Loss given to K-FAC
    reference: object  # (y, output) -> per-example loss, Keras's own function
    output_activation: str | None
    targets: str  # "label", "onehot", "binary" or "real"


LOSSES = {
    "softmax-sparse_ce": LossCase(keras.losses.SparseCategoricalCrossentropy,
                                  keras.losses.sparse_categorical_crossentropy,
                                  "softmax", "label"),
    "logits-sparse_ce": LossCase(
        functools.partial(keras.losses.SparseCategoricalCrossentropy, from_logits=True),
        functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True),
        None, "label"),
    "softmax-ce": LossCase(keras.losses.CategoricalCrossentropy,
                           keras.losses.categorical_crossentropy, "softmax", "onehot"),
    "sigmoid-bce": LossCase(keras.losses.BinaryCrossentropy,
                            keras.losses.binary_crossentropy, "sigmoid", "binary"),
    "logits-bce": LossCase(
        functools.partial(keras.losses.BinaryCrossentropy, from_logits=True),
        functools.partial(keras.losses.binary_crossentropy, from_logits=True),
        None, "binary"),
    "mse": LossCase(keras.losses.MeanSquaredError, keras.losses.mean_squared_error,
                    None, "real"),
}


# ------------------------------------------------------------------------- helpers

def make_targets(kind: str, rng, batch: int, classes: int) -> np.ndarray:
    if kind == "label":
        return rng.integers(0, classes, batch)
    if kind == "onehot":
        return np.eye(classes, dtype="float32")[rng.integers(0, classes, batch)]
    if kind == "binary":
        return rng.integers(0, 2, (batch, classes)).astype("float32")
    return rng.normal(size=(batch, classes)).astype("float32")


def draw_from_model(kind: str, rng, output: np.ndarray) -> np.ndarray:
    """Targets drawn from the predictive distribution of a model's output."""
    output = np.asarray(output, np.float64)
    if kind in ("label", "onehot"):
        p = output / output.sum(axis=1, keepdims=True)
        labels = np.array([rng.choice(len(row), p=row) for row in p])
        return labels if kind == "label" else np.eye(output.shape[1], dtype="float32")[labels]
    if kind == "binary":
        return (rng.random(output.shape) < output).astype("float32")
    return (output + rng.normal(size=output.shape) * math.sqrt(0.5)).astype("float32")


def mlp(sizes, hidden_activation, output_activation) -> keras.Sequential:
    layers = [keras.layers.Dense(n, activation=hidden_activation) for n in sizes[1:-1]]
    layers.append(keras.layers.Dense(sizes[-1], activation=output_activation))
    return keras.Sequential([keras.Input((sizes[0],)), *layers])


def dense_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def wbar(layer) -> np.ndarray:
    """W̄ = [kernel reshaped (d_in, d_out); bias] in float64."""
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    if layer.bias is None:
        return kernel
    return np.concatenate([kernel, np.asarray(layer.bias.numpy(), np.float64)[None]])


def with_ones(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones_like(rows[:, :1])], axis=1)


def kfac_step(model, loss, x, y, fisher, *, seed=7, **kwargs):
    """One `KFAC.step` with factor_decay=0 (so the factors are this batch's)."""
    settings = dict(learning_rate=1e-3, momentum=0.0, kl_clip=None, factor_decay=0.0)
    settings.update(kwargs)
    opt = tf_kfac.KFAC(fisher=fisher, seed=seed, **settings)
    opt.attach(model, loss=loss)
    logs = opt.step(x, y)
    return opt, logs


def factors_of(opt, layers):
    return [tuple(np.asarray(t, np.float64) for t in opt.kronecker_factors(layer))
            for layer in layers]


class Reference(NamedTuple):
    ggn: np.ndarray  # exact GGN block (1/B) Σᵢ Jᵢᵀ Hᵢ Jᵢ over row-major vec(W̄)
    a: np.ndarray  # (1/B) Σᵢ āᵢ āᵢᵀ from the hand-written forward pass
    g: np.ndarray  # Σᵢ Mᵢᵀ (∂²h/∂zᵢ²) Mᵢ, Mᵢ = ∂zᵢ/∂sᵢ: c·(1/B) Σᵢ E[gᵢ gᵢᵀ]


def brute_force(wbars, activations, loss_fn, x, y):
    """Exact GGN blocks and per-example K-FAC factors of an MLP, in float64.

    z is the last layer's pre-activation (the logits for the cross-entropies);
    h(z) = mean over the batch of `loss_fn(y, last_activation(z))`, so the output
    Hessian carries Keras's scale c and the 1/B. Returns (objective, [Reference]).
    """
    weights = [tf.Variable(w) for w in wbars]
    with tf.GradientTape(persistent=True) as tape:
        a = tf.constant(x, tf.float64)
        inputs, preacts = [], []
        for w, act in zip(weights, activations, strict=True):
            inputs.append(a)
            s = a @ w[:-1] + w[-1]
            preacts.append(s)
            a = ACTIVATIONS[act](s)
        z = preacts[-1]

    def objective(logits):
        return tf.reduce_mean(loss_fn(y, ACTIVATIONS[activations[-1]](logits)))

    z0 = tf.constant(z)
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = objective(z0)
        dz = inner.gradient(h, z0)
    hess = outer.jacobian(dz, z0).numpy()  # (B, k, B, k)
    batch, k = z.shape
    hess_flat = hess.reshape(batch * k, batch * k)

    refs = []
    for w, a, s in zip(weights, inputs, preacts, strict=True):
        jac = tape.jacobian(z, w).numpy().reshape(batch * k, -1)  # row-major vec(W̄)
        m = tape.jacobian(z, s).numpy()  # (B, k, B, d_out)
        g = sum(m[i, :, i].T @ hess[i, :, i] @ m[i, :, i] for i in range(batch))
        abar = with_ones(a.numpy())
        refs.append(Reference(jac.T @ hess_flat @ jac, abar.T @ abar / batch, g))
    del tape
    return float(h), refs


def setup_mlp(case_name, hidden_activation, batch, rng, sizes=(3, 5, 4, 3)):
    case = LOSSES[case_name]
    model = mlp(sizes, hidden_activation, case.output_activation)
    x = rng.normal(size=(batch, sizes[0])).astype("float32")
    y = make_targets(case.targets, rng, batch, sizes[-1])
    layers = dense_layers(model)
    activations = [layer.activation.__name__ for layer in layers]
    objective, refs = brute_force([wbar(la) for la in layers], activations, case.reference, x, y)
    return case, model, layers, x, y, objective, refs


# ------------------------------------------------------------- oracle 2: exact GGN

BATCH_ONE_CASES = [
    ("softmax-sparse_ce", "tanh"),
    ("logits-sparse_ce", "tanh"),
    ("softmax-ce", "tanh"),
    ("sigmoid-bce", "sigmoid"),
    ("logits-bce", "sigmoid"),
    ("mse", "tanh"),
]


@pytest.mark.parametrize(("case_name", "hidden"), BATCH_ONE_CASES)
def test_batch_size_one_kron_equals_exact_ggn_block(case_name, hidden, rng, rel_err):
    """At B = 1, fisher="exact": kron(A, G) of every layer is the exact GGN block.

    For one example the layer's Jacobian is J = āᵀ ⊗ M (M = ∂z/∂s), so Jᵀ H J =
    āāᵀ ⊗ MᵀHM factorises exactly; this pins the bias position, the row-major vec,
    the use of the logits when the model ends in softmax/sigmoid, and the scale c.
    """
    case, model, layers, x, y, objective, refs = setup_mlp(case_name, hidden, 1, rng)
    opt, logs = kfac_step(model, case.make(), x, y, "exact")
    assert float(logs["loss"]) == pytest.approx(objective, rel=1e-5)  # same objective as Keras
    blocks = {id(b.layer): b for b in opt._blocks if isinstance(b, KroneckerBlock)}
    for layer, (a, g), ref in zip(layers, factors_of(opt, layers), refs, strict=True):
        assert rel_err(a, ref.a) < TOL
        assert rel_err(g, ref.g) < TOL
        assert rel_err(np.kron(a, g), ref.ggn) < TOL
        dense = blocks[id(layer)].dense_curvature(*opt.kronecker_factors(layer))
        np.testing.assert_allclose(dense.numpy(), np.kron(a, g), rtol=1e-6, atol=1e-9)


def test_deep_linear_mse_kron_equals_exact_ggn_block_at_any_batch_size(rng, rel_err):
    """Deep linear network + mse, B = 8, fisher="exact": kron(A, G) is the exact GGN block.

    Checked numerically, this (docs/design.md §6, oracle 2) holds at every batch size,
    not only B = 1:
    in a linear network Mᵢ = ∂zᵢ/∂sᵢ is a product of the later kernels, the same for
    every example, and mse's output Hessian is the constant (2c/B)·I. So
    (1/B) Σᵢ āᵢāᵢᵀ ⊗ MᵀHM = A ⊗ G with no approximation at all.
    (`test_nonlinear_batch_kfac_is_the_per_example_factorisation` shows the same
    comparison fails for a tanh network at B > 1, where K-FAC is an approximation.)
    """
    case, model, layers, x, y, objective, refs = setup_mlp("mse", None, 8, rng, (4, 5, 4, 3))
    opt, logs = kfac_step(model, case.make(), x, y, "exact")
    assert float(logs["loss"]) == pytest.approx(objective, rel=1e-5)
    for (a, g), ref in zip(factors_of(opt, layers), refs, strict=True):
        assert rel_err(np.kron(a, g), ref.ggn) < TOL


@pytest.mark.parametrize("case_name", ["softmax-sparse_ce", "mse"])
def test_nonlinear_batch_kfac_is_the_per_example_factorisation(case_name, rng, rel_err):
    """tanh MLP, B = 6, fisher="exact": A and G are (1/B)Σāāᵀ and c(1/B)Σ MᵢᵀH_nllMᵢ.

    Here Mᵢ depends on the example, so E[āāᵀ ⊗ MᵀHM] ≠ E[āāᵀ] ⊗ E[MᵀHM]: the exact
    GGN block differs from kron(A, G) by far more than float error, which also shows
    that the GGN comparisons above are able to fail.
    """
    case, model, layers, x, y, objective, refs = setup_mlp(case_name, "tanh", 6, rng)
    opt, _ = kfac_step(model, case.make(), x, y, "exact")
    for (a, g), ref in zip(factors_of(opt, layers[:-1]), refs[:-1], strict=True):
        assert rel_err(a, ref.a) < TOL
        assert rel_err(g, ref.g) < TOL
        assert rel_err(np.kron(a, g), ref.ggn) > 100 * TOL


# ---------------------------------------------------- oracle 3: unbiased estimators

def exact_factors(model, case, x, y):
    exact_model = keras.models.clone_model(model)
    exact_model.set_weights(model.get_weights())
    opt, _ = kfac_step(exact_model, case.make(), x, y, "exact")
    return factors_of(opt, dense_layers(exact_model))


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
@pytest.mark.parametrize("case_name", ["softmax-sparse_ce", "sigmoid-bce", "mse"])
def test_estimators_average_to_the_exact_fisher(case_name, estimator, rng, rel_err):
    """Averaged over many draws, "sampled" and "empirical" G approach "exact" G.

    Repeating each of 3 examples M times gives every copy its own draw (a sampled
    target, or for "empirical" a real target drawn from the model's predictive
    distribution), while A and the exact G are unchanged by the repetition. The
    error must shrink with M (≈ 1/√M) to a few percent: both estimators have the
    exact Fisher's scale (c, and "empirical"'s division by c) in expectation.
    """
    case = LOSSES[case_name]
    model = mlp((3, 5, 4, 3), "tanh", case.output_activation)
    x = rng.normal(size=(3, 3)).astype("float32")
    y = make_targets(case.targets, rng, 3, 3)
    exact = exact_factors(model, case, x, y)
    errors = {}
    for copies in (4, 1024):
        x_rep = np.tile(x, (copies, 1))
        if estimator == "sampled":
            y_rep = np.tile(y, (copies,) + (1,) * (y.ndim - 1))
        else:
            y_rep = draw_from_model(case.targets, rng, model.predict(x_rep, verbose=0))
        run = keras.models.clone_model(model)
        run.set_weights(model.get_weights())
        opt, _ = kfac_step(run, case.make(), x_rep, y_rep, estimator, seed=copies)
        errors[copies] = []
        for (a, g), (a_exact, g_exact) in zip(factors_of(opt, dense_layers(run)), exact,
                                              strict=True):
            assert rel_err(a, a_exact) < TOL
            errors[copies].append(rel_err(g, g_exact))
    few, many = np.array(errors[4]), np.array(errors[1024])
    assert np.all(many < 0.1), errors
    assert many.mean() < few.mean() / 4, errors


def test_sampled_moving_average_over_steps_approaches_exact(rng, rel_err):
    """model.fit with fisher="sampled": the factor average over steps tends to "exact".

    The same batch is fed for many steps with a negligible learning rate, so the
    weights stay put and the debiased moving average (factor_decay ≥ 1 − 1/k) is the
    plain mean of per-step samples. It converges only if every step draws fresh
    targets (the seed advances with the step), and to the exact Fisher.
    """
    case = LOSSES["softmax-sparse_ce"]
    model = mlp((3, 5, 4, 3), "tanh", case.output_activation)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = make_targets(case.targets, rng, 4, 3)
    exact = exact_factors(model, case, x, y)
    weights = model.get_weights()
    opt = tf_kfac.KFAC(learning_rate=1e-12, momentum=0.0, kl_clip=None, damping=1.0,
                       factor_decay=0.999, fisher="sampled", seed=3, factor_update_interval=1)
    model.compile(optimizer=opt, loss=case.make())
    errors = []
    for steps in (3, 400):
        model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(steps), shuffle=False, verbose=0)
        g_errors = [rel_err(g, g_exact) for (_, g), (_, g_exact)
                    in zip(factors_of(opt, dense_layers(model)), exact, strict=True)]
        errors.append(np.array(g_errors))
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-7)
    assert np.all(errors[1] < 0.05), errors
    assert np.all(errors[1] < errors[0] / 3), errors


# ------------------------------------------------------------ oracle 5: Conv2D (KFC)

def patches_loop(x, kernel_size, strides, padding, dilation) -> np.ndarray:
    """(B, H_out, W_out, kh·kw·C) patches by an explicit loop, in kernel.reshape order."""
    batch, height, width, channels = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "valid":
        out_h, out_w, top, left = (height - span_h) // sh + 1, (width - span_w) // sw + 1, 0, 0
    else:  # TensorFlow's "same": the extra padding row/column goes at the bottom/right
        out_h, out_w = -(-height // sh), -(-width // sw)
        top = max((out_h - 1) * sh + span_h - height, 0) // 2
        left = max((out_w - 1) * sw + span_w - width, 0) // 2
    rows = np.zeros((batch, out_h, out_w, kh * kw * channels))
    for i in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                patch = []
                for ky in range(kh):
                    for kx in range(kw):
                        iy, ix = oy * sh + ky * dh - top, ox * sw + kx * dw - left
                        inside = 0 <= iy < height and 0 <= ix < width
                        patch.append(x[i, iy, ix] if inside else np.zeros(channels))
                rows[i, oy, ox] = np.concatenate(patch)
    return rows


CONV_CONFIGS = {
    "stride2-same-bias": dict(kernel_size=(3, 3), strides=(2, 2), padding="same",
                              dilation_rate=(1, 1), use_bias=True),
    "stride2-same-nobias": dict(kernel_size=(3, 3), strides=(2, 2), padding="same",
                                dilation_rate=(1, 1), use_bias=False),
    "dilated-valid-bias": dict(kernel_size=(2, 3), strides=(1, 1), padding="valid",
                               dilation_rate=(2, 2), use_bias=True),
    "dilated-valid-nobias": dict(kernel_size=(2, 3), strides=(1, 1), padding="valid",
                                 dilation_rate=(2, 2), use_bias=False),
    "dilated-same-bias": dict(kernel_size=(3, 2), strides=(1, 1), padding="same",
                              dilation_rate=(2, 1), use_bias=True),
}


@pytest.mark.parametrize("patches", ["one-hot-conv", "extract-patches"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS.values()), ids=list(CONV_CONFIGS))
def test_conv2d_factors_equal_explicit_patch_loop(config, patches, rng, rel_err, monkeypatch):
    """Conv2D (channels_last) Ω and Γ equal explicit loops over examples and positions.

    Ω = (1/B) Σᵢ Σₜ āᵢₜāᵢₜᵀ over patches from `patches_loop` (zero padding included),
    Γ = c·(1/B) Σᵢ (1/|T|) Σₜ gᵢₜgᵢₜᵀ with gᵢₜ = (B/c)·∂h/∂sᵢₜ (fisher="empirical"),
    where s is recomputed from the looped patches, so the loop itself is checked
    against the layer's output first. Odd input sizes make "same" padding asymmetric.
    """
    # Both ways the block extracts patches (chosen by patch size) must agree.
    depth = 0 if patches == "extract-patches" else 10**6
    monkeypatch.setattr(tf_kfac.blocks.conv, "_CONV_PATCH_DEPTH", depth)
    batch, filters = 2, 3
    x = rng.normal(size=(batch, 7, 6, 2)).astype("float32")
    y = rng.normal(size=(batch, 2)).astype("float32")
    conv = keras.layers.Conv2D(filters, activation="tanh", **config)
    head = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input(x.shape[1:]), conv, keras.layers.Flatten(), head])
    kernel_bar, head_bar = wbar(conv), wbar(head)

    patches = patches_loop(x.astype(np.float64), config["kernel_size"], config["strides"],
                           config["padding"], config["dilation_rate"])
    out_shape = patches.shape[:3]
    rows = patches.reshape(-1, patches.shape[-1])
    rows = with_ones(rows) if config["use_bias"] else rows
    s = tf.Variable(tf.reshape(rows @ kernel_bar, (*out_shape, filters)))
    np.testing.assert_allclose(np.tanh(s.numpy()), conv(x).numpy(), rtol=1e-4, atol=1e-5)
    with tf.GradientTape() as tape:
        flat = tf.reshape(tf.tanh(s), (batch, -1))
        z = flat @ head_bar[:-1] + head_bar[-1]
        h = tf.reduce_mean(keras.losses.mean_squared_error(tf.constant(y, tf.float64), z))
    g_hat = tape.gradient(h, s).numpy()

    c, positions = 1.0 / y.shape[1], out_shape[1] * out_shape[2]
    omega = np.zeros((rows.shape[1],) * 2)
    gamma = np.zeros((filters, filters))
    rows = rows.reshape(batch, positions, -1)
    for i in range(batch):
        for t in range(positions):
            omega += np.outer(rows[i, t], rows[i, t]) / batch
            g_it = (batch / c) * g_hat[i].reshape(positions, filters)[t]
            gamma += c * np.outer(g_it, g_it) / (batch * positions)

    opt, _ = kfac_step(model, keras.losses.MeanSquaredError(), x, y, "empirical")
    a, g = factors_of(opt, [conv])[0]
    assert rel_err(a, omega) < TOL
    assert rel_err(g, gamma) < TOL


def test_conv2d_covering_its_input_equals_dense(rng, rel_err):
    """A valid Conv2D whose kernel covers its whole input gives the Dense layer's A and G.

    Same weights (Dense kernel = conv kernel reshaped (kh·kw·C, filters)), same inputs,
    fisher="exact": one output position, so Ω = A and Γ = G for both layers.
    """
    x = rng.normal(size=(5, 3, 3, 2)).astype("float32")
    y = rng.integers(0, 3, 5)
    conv_model = keras.Sequential([
        keras.Input((3, 3, 2)), keras.layers.Conv2D(4, 3, activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    dense_model = keras.Sequential([
        keras.Input((3, 3, 2)), keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")])
    kernel, bias, head_kernel, head_bias = conv_model.get_weights()
    dense_model.set_weights([kernel.reshape(-1, 4), bias, head_kernel, head_bias])
    np.testing.assert_allclose(dense_model(x), conv_model(x), rtol=1e-5, atol=1e-6)

    loss = keras.losses.SparseCategoricalCrossentropy
    conv_opt, _ = kfac_step(conv_model, loss(), x, y, "exact")
    dense_opt, _ = kfac_step(dense_model, loss(), x, y, "exact")
    conv_layers = [conv_model.layers[0], conv_model.layers[2]]
    for (a, g), (a_d, g_d) in zip(factors_of(conv_opt, conv_layers),
                                  factors_of(dense_opt, dense_layers(dense_model)), strict=True):
        assert rel_err(a, a_d) < 1e-5
        assert rel_err(g, g_d) < 1e-5
