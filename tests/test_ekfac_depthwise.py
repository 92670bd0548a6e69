"""EKFAC for DepthwiseConv1D/2D and the parts of SeparableConv2D against dense NumPy oracles
(docs/design.md, oracle 22, §7).

Each input channel c of a depthwise convolution has its own weights W̄_c = [the
kernel slice kernel[..., c, :] as (window, m); its m biases] and its own
Kronecker pair A_c ⊗ G_c, so EKFAC keeps one eigenbasis Q_c = U_A[c] ⊗ U_G[c]
per channel. The oracles never use tf_kfac: the per-example gradients of each
channel's weights come from `tf.GradientTape.jacobian` of the per-example losses,
the patches from explicit loops over the positions, A_c and G_c from those, the
bases from `np.linalg.eigh`, and F_c is the dense mean of the per-example
gradients' outer products over row-major vec(W̄_c).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

BATCH = 16
CHANNELS, MULTIPLIER = 2, 2


def _model(kind):
    """A depthwise convolution (valid padding, stride 1) under a small head."""
    keras.utils.set_random_seed(0)
    if kind == "1d":
        layer = keras.layers.DepthwiseConv1D(3, depth_multiplier=MULTIPLIER, name="depthwise")
        shape = (6, CHANNELS)
    else:
        layer = keras.layers.DepthwiseConv2D((2, 2), depth_multiplier=MULTIPLIER,
                                             name="depthwise")
        shape = (4, 3, CHANNELS)
    head = [keras.layers.Activation("tanh"), keras.layers.Flatten(), keras.layers.Dense(3)]
    return keras.Sequential([keras.Input(shape), layer, *head]), layer, head


def _patches(x, window):
    """(B, positions, C, window + 1): each valid position's patch per channel, then the 1."""
    x = np.asarray(x, np.float64)
    spatial = x.shape[1:-1]
    starts = itertools.product(*[range(n - k + 1) for n, k in zip(spatial, window, strict=True)])
    rows = []
    for start in starts:
        index = tuple(slice(s, s + k) for s, k in zip(start, window, strict=True))
        patch = x[(slice(None), *index, slice(None))]  # (B, *window, C)
        rows.append(np.moveaxis(patch.reshape(len(x), -1, x.shape[-1]), 1, 2))
    patches = np.stack(rows, axis=1)
    return np.concatenate([patches, np.ones((*patches.shape[:-1], 1))], axis=-1)


def _jacobians(layer, head, x, y):
    """(∇W̄ᵢ,c as (B, C, window + 1, m), ∂ℓᵢ/∂sᵢₜ as (B, positions, C, m)), float64."""
    with tf.GradientTape(persistent=True) as tape:
        s = layer(x)
        tape.watch(s)
        out = s
        for part in head:
            out = part(out)
        losses = keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
    kernel_jac, bias_jac = tape.jacobian(losses, [layer.kernel, layer.bias])
    kernel_jac = np.asarray(kernel_jac, np.float64).reshape(BATCH, -1, CHANNELS, MULTIPLIER)
    bias_jac = np.asarray(bias_jac, np.float64).reshape(BATCH, 1, CHANNELS, MULTIPLIER)
    per_example = np.moveaxis(np.concatenate([kernel_jac, bias_jac], axis=1), 2, 1)
    s_jac = np.asarray(tape.jacobian(losses, s), np.float64)
    at_s = s_jac[np.arange(BATCH), np.arange(BATCH)].reshape(BATCH, -1, CHANNELS, MULTIPLIER)
    return per_example, at_s


def _factors(patches, at_s):
    """K-FAC's empirical (A_c, G_c) per channel: A sums the positions, G averages them."""
    a = np.einsum("btci,btcj->cij", patches, patches) / BATCH
    g = np.einsum("btci,btcj->cij", at_s, at_s) / (BATCH * at_s.shape[1])
    return a, g


def _rel(actual, desired):
    return float(np.linalg.norm(np.asarray(actual, np.float64) - desired)
                 / np.linalg.norm(desired))


def _run(kind, rng):
    """Two full-batch steps: the first sets each channel's eigenbasis from (A_c, G_c) at θ₀,
    the second measures S in it at θ₁ (factor_decay=0: the batch's own statistics)."""
    model, layer, head = _model(kind)
    x = rng.normal(size=(BATCH, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, size=BATCH).astype("int32")
    opt = tf_kfac.KFAC(fisher="empirical", factor_decay=0.0, factor_update_interval=1,
                       inverse_update_interval=1000, curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    window = layer.kernel.shape[:-2]
    _, at_s0 = _jacobians(layer, head, x, y)
    patches = _patches(x, window)
    factors0 = _factors(patches, at_s0)
    opt.step(x, y)
    per_example1, at_s1 = _jacobians(layer, head, x, y)
    opt.step(x, y)
    return opt._blocks[0], factors0, patches, per_example1, at_s1


@pytest.fixture(scope="module", params=["1d", "2d"])
def run(request):
    return _run(request.param, np.random.default_rng(3))


def test_second_moments_are_each_channels_fisher_diagonal_in_its_eigenbasis(run):
    """S_c after the second step equals diag(Q_cᵀ F_c Q_c) for every channel, with Q_c the
    NumPy eigenbasis of (A_c, G_c) at θ₀ and F_c the Jacobian Fisher of the channel's
    weights at θ₁. Negative controls: K-FAC's λ_A ⊗ λ_G per channel, and the squares
    taken per position, Σₜ (ãᵢₜ g̃ᵢₜᵀ)², which treat the positions as examples."""
    block, (a0, g0), patches, per_example, at_s = run
    assert block.kind == "depthwise_conv+ekfac"
    assert float(block.moments_basis.numpy()) == float(block.basis.numpy()) == 1.0
    measured = np.asarray(block.second_moments, np.float64)
    assert measured.shape == (CHANNELS, per_example.shape[2], MULTIPLIER)
    for c in range(CHANNELS):
        eig_a, u_a = np.linalg.eigh(a0[c])
        eig_g, u_g = np.linalg.eigh(g0[c])
        np.testing.assert_allclose(block.a_eigenvalues[c], eig_a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(block.g_eigenvalues[c], eig_g, rtol=1e-4, atol=1e-9)
        flat = per_example[:, c].reshape(BATCH, -1)
        fisher = flat.T @ flat / BATCH
        q = np.kron(u_a, u_g)
        optimum = np.diag(q.T @ fisher @ q).reshape(len(u_a), len(u_g))
        assert _rel(measured[c], optimum) < 1e-4, c
        assert _rel(measured[c], np.outer(eig_a, eig_g)) > 1e-2, c
        positions = np.einsum("bti,ij,btk,kl->btjl", patches[:, :, c], u_a, at_s[:, :, c],
                              u_g) ** 2
        per_position = positions.sum(1).mean(0)
        assert _rel(per_position, optimum) > 0.1, c
        assert _rel(measured[c], per_position) > 0.1, c


def test_ekfac_reduces_to_kfac_per_channel_when_the_moments_are_the_eigenvalue_products(run):
    """With S_c = λ_A[c] ⊗ λ_G[c] and no damping the block's direction is A_c⁻¹ ∇W̄_c G_c⁻¹
    for every channel (dense NumPy solves with the NumPy factors of θ₀); with the
    measured S (negative control) it is not."""
    block, (a0, g0), _, _, _ = run
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=block.kernel_shape)
    bias = rng.normal(size=(CHANNELS * MULTIPLIER,))
    bases = [tf.convert_to_tensor(block.a_basis), tf.convert_to_tensor(block.g_basis)]
    products = (np.asarray(block.a_eigenvalues)[:, :, None]
                * np.asarray(block.g_eigenvalues)[:, None, :])

    def direction(scaling):
        parts = block.precondition(
            [tf.constant(kernel, tf.float32), tf.constant(bias, tf.float32)],
            [*bases, tf.constant(scaling, tf.float32)], tf.constant(1.0))
        return np.asarray(parts[0], np.float64), np.asarray(parts[1], np.float64)

    kfac_kernel, kfac_bias = direction(products)
    measured_kernel, _ = direction(np.asarray(block.second_moments))
    for c in range(CHANNELS):
        grad = np.concatenate([kernel[..., c, :].reshape(-1, MULTIPLIER),
                               bias.reshape(CHANNELS, MULTIPLIER)[c][None]], axis=0)
        expected = np.linalg.solve(a0[c], grad) @ np.linalg.inv(g0[c])
        actual = np.concatenate([kfac_kernel[..., c, :].reshape(-1, MULTIPLIER),
                                 kfac_bias.reshape(CHANNELS, MULTIPLIER)[c][None]], axis=0)
        assert _rel(actual, expected) < 1e-3, c
        wrong = measured_kernel[..., c, :].reshape(-1, MULTIPLIER)
        assert _rel(wrong, expected[:-1]) > 1e-2, c


def test_second_moments_carry_the_sample_weights_once(rng):
    """With sample weights wᵢ (zeros and fractions), S_c = (1/B) Σᵢ wᵢ (U_A[c]ᵀ ∇W̄ᵢ,c U_G[c])²
    in the stored bases, the patches unweighted (A_c alone is their weighted mean).
    Negative controls: no weights, and w²."""
    model, layer, head = _model("2d")
    x = rng.normal(size=(BATCH, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, size=BATCH).astype("int32")
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], size=BATCH).astype("float32")
    opt = tf_kfac.KFAC(fisher="empirical", factor_decay=0.0, factor_update_interval=1,
                       inverse_update_interval=1000, curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.step(x, y, sample_weight=weights)
    block = opt._blocks[0]
    per_example, _ = _jacobians(layer, head, x, y)
    u_a = np.asarray(block.a_basis, np.float64)
    u_g = np.asarray(block.g_basis, np.float64)
    opt.step(x, y, sample_weight=weights)  # S in the bases read above, at these weights
    squares = np.einsum("cji,bcjk,ckl->bcil", u_a, per_example, u_g) ** 2
    measured = np.asarray(block.second_moments, np.float64)
    assert _rel(measured, np.mean(weights[:, None, None, None] * squares, axis=0)) < 1e-4
    assert _rel(measured, squares.mean(0)) > 1e-2
    assert _rel(measured, np.mean(weights[:, None, None, None] ** 2 * squares, axis=0)) > 1e-2


def test_fit_trains_depthwise_convolutions_with_ekfac(rng):
    """`fit` (a compiled step) with a depthwise convolution of one output per channel (1×1
    G_c, the usual layer) and a separable one of two: finite state, no skipped step, the
    loss goes down."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.DepthwiseConv2D(3, activation="tanh")(inputs)
    h = keras.layers.SeparableConv2D(4, 2, depth_multiplier=2, activation="tanh")(h)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(64, 6, 6, 3)).astype("float32")
    y = (x[..., 0].mean((1, 2)) > 0).astype("int32") + (x[..., 1].mean((1, 2)) > 0)
    opt = tf_kfac.KFAC(curvature="ekfac", factor_update_interval=2, inverse_update_interval=4,
                       seed=0)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    assert [b.kind for b in opt._blocks] == ["depthwise_conv+ekfac", "separable_conv+ekfac",
                                             "dense+ekfac"]
    assert history["loss"][-1] < 0.9 * history["loss"][0]
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    assert float(opt._blocks[0].moments_basis.numpy()) >= 2.0
    for block in opt._blocks:
        for variable in block.state:
            assert np.all(np.isfinite(variable.numpy())), variable.path


def test_separable_parts_measure_their_own_second_moments(rng):
    """SeparableConv2D under EKFAC: the depthwise part's S_c and the pointwise part's S (a
    Dense layer at every position of the depthwise output, with the bias) each equal the
    mean over the examples of the Jacobian gradients projected on the part's stored bases
    and squared, restarted in the new basis (at the default factor_decay, which an
    average continued across the refresh would show). Negative controls: K-FAC's
    λ_A ⊗ λ_G, and the squared mean gradient."""
    keras.utils.set_random_seed(0)
    layer = keras.layers.SeparableConv2D(3, (2, 2), depth_multiplier=MULTIPLIER,
                                         name="separable")
    head = [keras.layers.Activation("tanh"), keras.layers.Flatten(), keras.layers.Dense(3)]
    model = keras.Sequential([keras.Input((4, 3, CHANNELS)), layer, *head])
    x = rng.normal(size=(BATCH, 4, 3, CHANNELS)).astype("float32")
    y = rng.integers(0, 3, size=BATCH).astype("int32")
    opt = tf_kfac.KFAC(fisher="empirical", factor_update_interval=1,
                       inverse_update_interval=1000, curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.step(x, y)
    block = opt._blocks[0]
    assert block.kind == "separable_conv+ekfac"
    assert [p.kind for p in block.parts] == ["depthwise_conv+ekfac", "dense+ekfac"]
    with tf.GradientTape() as tape:
        out = layer(x)
        for part in head:
            out = part(out)
        losses = keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
    depthwise_jac, pointwise_jac, bias_jac = (np.asarray(j, np.float64) for j in tape.jacobian(
        losses, [layer.depthwise_kernel, layer.pointwise_kernel, layer.bias]))
    bases = [(np.asarray(p.a_basis, np.float64), np.asarray(p.g_basis, np.float64))
             for p in block.parts]
    opt.step(x, y)  # S in the bases read above, at the weights of the Jacobians
    depthwise = np.moveaxis(depthwise_jac.reshape(BATCH, -1, CHANNELS, MULTIPLIER), 2, 1)
    pointwise = np.concatenate([pointwise_jac.reshape(BATCH, CHANNELS * MULTIPLIER, -1),
                                bias_jac[:, None]], axis=1)
    (u_a, u_g), (v_a, v_g) = bases
    expected = [np.einsum("cji,bcjk,ckl->bcil", u_a, depthwise, u_g) ** 2,
                np.einsum("ji,bjk,kl->bil", v_a, pointwise, v_g) ** 2]
    mean_grads = [np.einsum("cji,cjk,ckl->cil", u_a, depthwise.mean(0), u_g) ** 2,
                  np.einsum("ji,jk,kl->il", v_a, pointwise.mean(0), v_g) ** 2]
    for part, squares, mean_grad in zip(block.parts, expected, mean_grads, strict=True):
        assert float(part.moments_basis.numpy()) == float(part.basis.numpy()) == 1.0
        measured = np.asarray(part.second_moments, np.float64)
        assert _rel(measured, squares.mean(0)) < 1e-4, part.name
        products = (np.asarray(part.a_eigenvalues)[..., :, None]
                    * np.asarray(part.g_eigenvalues)[..., None, :])
        assert _rel(measured, products) > 1e-2, part.name
        assert _rel(measured, mean_grad) > 0.1, part.name
