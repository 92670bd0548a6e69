"""EKFAC (`curvature="ekfac"`) against dense NumPy oracles (docs/design.md, oracles 15–17, §7).

The oracles never use tf_kfac: the per-example gradients come from Jacobians of
the per-example losses (`tf.GradientTape.jacobian`), the factors A and G from
the layer inputs and those gradients, the eigenbases from `np.linalg.eigh`, and
the Fisher block is the dense mean of the per-example gradients' outer products
over row-major vec(W̄), W̄ = [kernel; bias].
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac.blocks import ekfac

BATCH = 64
LR = 0.5
DAMPING = 1e-2


# ----------------------------------------------------------------- oracles
def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(3),
    ])


def _data(rng, n=BATCH):
    x = rng.normal(size=(n, 4)).astype("float32")
    y = ((x[:, 0] > 0).astype("int32") + (x[:, 1] * x[:, 2] > 0)).astype("int32")
    return x, y


def _per_example_gradients(model, x, y):
    """Per layer, ∇W̄ᵢ of ℓᵢ = −log p(yᵢ|xᵢ) as (B, d_in + 1, d_out), float64."""
    with tf.GradientTape() as tape:
        losses = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    jacobians = tape.jacobian(losses, model.trainable_variables)
    out = []
    for kernel, bias in zip(jacobians[::2], jacobians[1::2], strict=True):
        out.append(np.concatenate([np.asarray(kernel, np.float64),
                                   np.asarray(bias, np.float64)[:, None, :]], axis=1))
    return out


def _layer_inputs(model, x):
    """Each Dense layer's input with the bias' 1 appended, float64."""
    inputs, h = [], np.asarray(x, np.float64)
    for layer in model.layers:
        inputs.append(np.concatenate([h, np.ones((len(h), 1))], axis=1))
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        h = h @ kernel + bias
        if layer.activation is keras.activations.tanh:
            h = np.tanh(h)
    return inputs


def _factors(model, x, y):
    """K-FAC's empirical (A, G) per layer: G from the per-example bias gradients."""
    grads = _per_example_gradients(model, x, y)
    return [(a.T @ a / len(a), g[:, -1].T @ g[:, -1] / len(a))
            for a, g in zip(_layer_inputs(model, x), grads, strict=True)]


def _fisher(per_example):
    """The dense Fisher block E[vec(∇W̄ᵢ) vec(∇W̄ᵢ)ᵀ] over row-major vec."""
    flat = per_example.reshape(len(per_example), -1)
    return flat.T @ flat / len(flat)


def _eigenbasis_diagonal(fisher, u_a, u_g):
    """diag(Qᵀ F Q), Q = U_A ⊗ U_G, as (d_in, d_out)."""
    q = np.kron(u_a, u_g)
    return np.diag(q.T @ fisher @ q).reshape(len(u_a), len(u_g))


def _distance(fisher, u_a, u_g, scaling):
    """‖F − Q diag(scaling) Qᵀ‖_F."""
    q = np.kron(u_a, u_g)
    return np.linalg.norm(fisher - q @ np.diag(scaling.ravel()) @ q.T)


def _ekfac_direction(grad, u_a, u_g, scaling):
    return u_a @ ((u_a.T @ grad @ u_g) / scaling) @ u_g.T


def _weights(model):
    """Per layer W̄ = [kernel; bias], float64."""
    return [np.concatenate([np.asarray(layer.kernel, np.float64),
                            np.asarray(layer.bias, np.float64)[None]], axis=0)
            for layer in model.layers]


def _rel(actual, desired):
    return float(np.linalg.norm(np.asarray(actual, np.float64) - desired)
                 / np.linalg.norm(desired))


# ------------------------------------------------------------ a short run
def _two_steps(rng):
    """Two full-batch EKFAC steps: step 0 sets the eigenbasis from (A₀, G₀) at θ₀,
    step 1 measures S in it at θ₁ and preconditions with S (factor_decay=0: the
    moving averages are the latest batch's)."""
    x, y = _data(rng)
    model = _mlp()
    opt = tf_kfac.KFAC(learning_rate=LR, damping=DAMPING, momentum=0.0, kl_clip=None,
                       fisher="empirical", factor_decay=0.0, factor_update_interval=1,
                       inverse_update_interval=1000, curvature="ekfac", seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt.attach(model, loss)
    states = [(_weights(model), _factors(model, x, y), _per_example_gradients(model, x, y))]
    opt.step(x, y)
    states.append((_weights(model), _factors(model, x, y), _per_example_gradients(model, x, y)))
    opt.step(x, y)
    states.append((_weights(model), None, None))
    return model, opt, states


@pytest.fixture(scope="module")
def run():
    return _two_steps(np.random.default_rng(7))


def test_blocks_are_the_ekfac_variants(run):
    model, opt, _ = run
    assert [b.kind for b in opt._blocks] == ["dense+ekfac", "dense+ekfac"]
    assert all(isinstance(b, ekfac.EigenbasisRescaling) for b in opt._blocks)


def test_second_moments_are_the_fisher_diagonal_in_the_eigenbasis(run):
    """Oracle 13, the eigenbasis property: S after step 1 equals diag(Qᵀ F Q) for
    the Jacobian Fisher at θ₁ and Q the NumPy eigenbasis of (A₀, G₀); that
    diagonal is the Frobenius-closest to F among matrices diagonal in Q.
    Negative controls: K-FAC's λ_A ⊗ λ_G, a perturbed S and S in another basis
    are all farther from F, and the package's S is not close to them."""
    model, opt, states = run
    (_, factors0, _), (_, _, grads1), _ = states
    checked = 0
    for block, (a0, g0), per_example in zip(opt._blocks, factors0, grads1, strict=True):
        eig_a, u_a = np.linalg.eigh(a0)
        eig_g, u_g = np.linalg.eigh(g0)
        fisher = _fisher(per_example)
        optimum = _eigenbasis_diagonal(fisher, u_a, u_g)
        measured = np.asarray(block.second_moments, np.float64)
        assert float(block.moments_basis.numpy()) == float(block.basis.numpy()) == 1.0
        assert _rel(measured, optimum) < 1e-4

        best = _distance(fisher, u_a, u_g, optimum)
        assert _distance(fisher, u_a, u_g, measured) <= best * (1 + 1e-6)
        kfac = np.outer(eig_a, eig_g)
        perturbed = optimum * (1 + 0.05 * np.random.default_rng(0).normal(size=optimum.shape))
        q_other, _ = np.linalg.qr(np.random.default_rng(1).normal(size=u_a.shape))
        rotated = _eigenbasis_diagonal(fisher, q_other, u_g)
        for wrong in (kfac, perturbed):
            assert _distance(fisher, u_a, u_g, wrong) > best * (1 + 1e-3)
            assert _rel(measured, wrong) > 1e-2
        assert _distance(fisher, q_other, u_g, rotated) > best * (1 + 1e-3)
        assert _rel(measured, rotated) > 1e-2
        checked += 1
    assert checked == 2


def test_ekfac_reduces_to_kfac_when_the_moments_are_the_eigenvalue_products(run):
    """Oracle 14: with S = λ_A ⊗ λ_G and no damping the EKFAC direction is
    A⁻¹ ∇ G⁻¹ (dense NumPy solve with the NumPy factors of θ₀); with the measured
    S (negative control) it is not."""
    model, opt, states = run
    (_, factors0, _), _, _ = states
    block = opt._blocks[0]  # the hidden layer: G is full rank (the logits' is not)
    a0, g0 = factors0[0]
    grad = np.random.default_rng(2).normal(size=(block.input_size, block.output_size))
    kernel, bias = grad[:-1], grad[-1]
    eig_a = np.asarray(block.a_eigenvalues, np.float64)
    eig_g = np.asarray(block.g_eigenvalues, np.float64)
    np.testing.assert_allclose(eig_a, np.linalg.eigvalsh(a0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eig_g, np.linalg.eigvalsh(g0), rtol=1e-4, atol=1e-9)
    bases = [tf.convert_to_tensor(block.a_basis), tf.convert_to_tensor(block.g_basis)]
    expected = np.linalg.solve(a0, grad) @ np.linalg.inv(g0)

    def direction(scaling):
        parts = block.precondition([tf.constant(kernel, tf.float32), tf.constant(bias,
                                   tf.float32)], [*bases, tf.constant(scaling, tf.float32)],
                                   tf.constant(1.0))
        return np.concatenate([np.asarray(parts[0]), np.asarray(parts[1])[None]], axis=0)

    assert _rel(direction(np.outer(eig_a, eig_g)), expected) < 1e-3
    assert _rel(direction(np.asarray(block.second_moments)), expected) > 1e-2


def test_right_after_a_refresh_the_scaling_is_the_eigenvalue_products(rng):
    """Until S is measured in a new basis, the preconditioner uses λ_A ⊗ λ_G + δ,
    δ = damping·c (c = 1): one step's statistics and preconditioner."""
    x, y = _data(rng)
    model = _mlp()
    opt = tf_kfac.KFAC(damping=DAMPING, fisher="empirical", curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    factors = _factors(model, x, y)
    opt.step(x, y)
    for block, (a0, g0) in zip(opt._blocks, factors, strict=True):
        values = [tf.convert_to_tensor(v) for v in block.refreshed]
        stats = [tf.convert_to_tensor(v) for v in block.statistics]
        scaling = np.asarray(block.preconditioner(values, stats)[2], np.float64)
        expected = np.outer(np.linalg.eigvalsh(a0), np.linalg.eigvalsh(g0)) + DAMPING
        np.testing.assert_allclose(scaling, expected, rtol=1e-3, atol=1e-6)


def test_one_step_equals_the_dense_numpy_ekfac_update(run):
    """Oracle 15: W̄₂ − W̄₁ = −lr·U_A[(U_Aᵀ ∇ U_G) / (S + δ)]U_Gᵀ with NumPy's
    eigenbasis of (A₀, G₀), S and ∇ from the Jacobians at θ₁, δ = damping; and
    W̄₁ − W̄₀ uses λ_A ⊗ λ_G + δ. Negative control: step 1 with λ_A ⊗ λ_G."""
    _, _, states = run
    (w0, factors0, grads0), (w1, _, grads1), (w2, _, _) = states
    for layer in range(2):
        eig_a, u_a = np.linalg.eigh(factors0[layer][0])
        eig_g, u_g = np.linalg.eigh(factors0[layer][1])
        kfac = np.outer(eig_a, eig_g) + DAMPING
        step0 = -LR * _ekfac_direction(grads0[layer].mean(0), u_a, u_g, kfac)
        assert _rel(w1[layer] - w0[layer], step0) < 1e-3
        measured = _eigenbasis_diagonal(_fisher(grads1[layer]), u_a, u_g) + DAMPING
        grad1 = grads1[layer].mean(0)
        step1 = -LR * _ekfac_direction(grad1, u_a, u_g, measured)
        assert _rel(w2[layer] - w1[layer], step1) < 1e-3
        wrong = -LR * _ekfac_direction(grad1, u_a, u_g, kfac)
        assert _rel(wrong, step1) > 1e-2
        assert _rel(w2[layer] - w1[layer], wrong) > 1e-2


def test_second_moments_restart_in_a_new_basis(rng):
    """S averages the batches measured in one basis (mean first, as the factors'
    debiasing) and restarts after a refresh changed the basis. Negative control:
    the average continued across the change."""
    x, y = _data(rng)
    model = _mlp()
    opt = tf_kfac.KFAC(fisher="empirical", factor_decay=0.95, factor_update_interval=1,
                       inverse_update_interval=2, curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    block = opt._blocks[0]

    def batch_moments():  # this batch's S in the stored basis, from the Jacobians
        u_a = np.asarray(block.a_basis, np.float64)
        u_g = np.asarray(block.g_basis, np.float64)
        per_example = _per_example_gradients(model, x, y)[0]
        return np.mean(np.einsum("ji,bjk,kl->bil", u_a, per_example, u_g) ** 2, axis=0)

    opt.step(x, y)  # iteration 0: refresh, basis 1
    s1 = batch_moments()
    opt.step(x, y)  # iteration 1: the first batch in basis 1
    assert _rel(block.second_moments, s1) < 1e-4
    s2 = batch_moments()
    opt.step(x, y)  # iteration 2: two batches in basis 1, then refresh, basis 2
    assert _rel(block.second_moments, (s1 + s2) / 2) < 1e-4
    assert (float(block.moments_basis.numpy()), float(block.basis.numpy())) == (1.0, 2.0)
    s3 = batch_moments()
    opt.step(x, y)  # iteration 3: the first batch in basis 2
    assert _rel(block.second_moments, s3) < 1e-4
    assert float(block.moments_count.numpy()) == 1.0
    continued = (2 / 3) * (s1 + s2) / 2 + s3 / 3
    assert _rel(continued, s3) > 1e-2 and _rel(block.second_moments, continued) > 1e-2


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_second_moments_carry_the_sample_weights_once(fisher, rng):
    """With sample weights wᵢ (zeros and fractions), S = (1/B) Σᵢ wᵢ (U_Aᵀ ∇W̄ᵢ U_G)²
    over the examples' gradients of −log p, as F carries them. For "empirical"
    ∇W̄ᵢ is the real target's gradient; for "exact" (one backward pass per column
    of the softmax Hessian's square root) the sum over the columns: for the
    logits layer, whose Jacobian is āᵢ ⊗ I, the diagonal in Q of
    kron(āᵢāᵢᵀ, diag(pᵢ) − pᵢpᵢᵀ). Negative controls: no weights, and w².
    """
    x, y = _data(rng, 32)
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], size=32).astype("float32")
    model = _mlp()
    opt = tf_kfac.KFAC(fisher=fisher, factor_decay=0.0, factor_update_interval=1,
                       curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.step(x, y, sample_weight=weights)
    block = opt._blocks[1]  # the logits layer: its Jacobian is its input row
    u_a = np.asarray(block.a_basis, np.float64)
    u_g = np.asarray(block.g_basis, np.float64)
    a = _layer_inputs(model, x)[1]
    if fisher == "empirical":
        p = np.asarray(tf.nn.softmax(model(x)), np.float64)
        g = p - np.eye(3)[y]  # ∂(−log p(yᵢ))/∂zᵢ; ∇W̄ᵢ = āᵢgᵢᵀ
        squares = np.einsum("ji,bj,bk,kl->bil", u_a, a, g, u_g) ** 2
    else:
        p = np.asarray(tf.nn.softmax(model(x)), np.float64)
        squares = np.zeros((32, *block.second_moments.shape))
        for i in range(32):  # Fisher of example i: kron(aaᵀ, diag(p) − ppᵀ), diagonal in Q
            hess = np.diag(p[i]) - np.outer(p[i], p[i])
            squares[i] = np.outer((u_a.T @ a[i]) ** 2, np.diag(u_g.T @ hess @ u_g))
    opt.step(x, y, sample_weight=weights)  # S in the basis read above, at these weights
    measured = np.asarray(block.second_moments, np.float64)
    expected = np.mean(weights[:, None, None] * squares, axis=0)
    assert _rel(measured, expected) < 1e-3
    assert _rel(measured, squares.mean(0)) > 1e-2
    assert _rel(measured, np.mean(weights[:, None, None] ** 2 * squares, axis=0)) > 1e-2


# -------------------------------------------- per-example gradients, sharing
def _shared_model(kind):
    """A model whose first layer shares its weights over positions, and its input shape."""
    keras.utils.set_random_seed(0)
    if kind == "conv1d":
        layer, shape = keras.layers.Conv1D(3, 3, padding="same", name="shared"), (6, 2)
    elif kind == "conv2d":
        layer, shape = keras.layers.Conv2D(3, (2, 2), name="shared"), (4, 4, 2)
    elif kind == "dense_sequence":
        layer, shape = keras.layers.Dense(3, name="shared"), (5, 2)
    else:  # the kernel is already (contracted, output)
        layer = keras.layers.EinsumDense("btc,cd->btd", (5, 3), bias_axes="d", name="shared")
        shape = (5, 2)
    head = [keras.layers.Activation("tanh"), keras.layers.Flatten(), keras.layers.Dense(3)]
    return keras.Sequential([keras.Input(shape), layer, *head]), layer, head, shape


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "dense_sequence", "einsum"])
def test_second_moments_use_the_per_example_gradients_over_positions(kind, sharing, rng):
    """S = (1/B) Σᵢ (U_Aᵀ ∇W̄ᵢ U_G)² with ∇W̄ᵢ = Σₜ āᵢₜ gᵢₜᵀ, the example's whole
    gradient (from the Jacobian), in either flavour (the flavour shapes only A
    and G, so the basis). Negative controls: the squared mean gradient, and for
    the sequence layers the per-position squares Σₜ (ãᵢₜ g̃ᵢₜᵀ)², which treat
    positions as examples."""
    model, layer, head, shape = _shared_model(kind)
    x = rng.normal(size=(16, *shape)).astype("float32")
    y = rng.integers(0, 3, size=16).astype("int32")
    opt = tf_kfac.KFAC(fisher="empirical", factor_decay=0.0, factor_update_interval=1,
                       curvature="ekfac", weight_sharing=sharing, seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.step(x, y)  # the basis, from this step's A and G
    block = opt._blocks[0]
    assert block.kind.endswith("+ekfac") and block.weight_sharing == sharing
    with tf.GradientTape(persistent=True) as tape:
        s = layer(x)
        tape.watch(s)
        out = s
        for part in head:
            out = part(out)
        losses = keras.losses.sparse_categorical_crossentropy(y, out, from_logits=True)
    kernel_jac, bias_jac = tape.jacobian(losses, [layer.kernel, layer.bias])
    d_out = layer.kernel.shape[-1]
    per_example = np.concatenate([np.asarray(kernel_jac, np.float64).reshape(16, -1, d_out),
                                  np.asarray(bias_jac, np.float64)[:, None, :]], axis=1)
    u_a = np.asarray(block.a_basis, np.float64)
    u_g = np.asarray(block.g_basis, np.float64)
    opt.step(x, y)  # S in that basis, at the weights the Jacobians were taken at
    expected = np.mean(np.einsum("ji,bjk,kl->bil", u_a, per_example, u_g) ** 2, axis=0)
    measured = np.asarray(block.second_moments, np.float64)
    assert _rel(measured, expected) < 1e-3
    mean_grad = np.einsum("ji,jk,kl->il", u_a, per_example.mean(0), u_g) ** 2
    assert _rel(measured, mean_grad) > 0.1
    if kind in ("dense_sequence", "einsum"):
        s_grads = np.asarray(tape.jacobian(losses, s), np.float64)
        g = s_grads[np.arange(16), np.arange(16)]  # (B, T, d_out): ∂ℓᵢ/∂sᵢₜ
        a = np.concatenate([x.astype(np.float64), np.ones((16, shape[0], 1))], axis=-1)
        positions = np.einsum("bti,ij,btk,kl->btjl", a, u_a, g, u_g) ** 2
        assert _rel(positions.sum(1).mean(0), expected) > 0.1
        assert _rel(measured, positions.sum(1).mean(0)) > 0.1


def test_kinds_without_an_ekfac_variant_keep_their_kfac_blocks(rng):
    """An EinsumDense whose output lists the positions in another order and a
    LayerNormalization keep K-FAC; the depthwise convolution (its own EKFAC per
    channel, tests/test_ekfac_depthwise.py) and the Dense layer get EKFAC."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4, 2))
    hidden = keras.layers.DepthwiseConv2D((2, 2), padding="same", name="depthwise")(inputs)
    hidden = keras.layers.EinsumDense("abcd,de->acbe", (4, 3, 5), bias_axes="e",
                                      name="transposed")(hidden)
    hidden = keras.layers.LayerNormalization()(hidden)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    opt = tf_kfac.KFAC(curvature="ekfac", seed=0)
    opt.attach(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert [b.kind for b in opt._blocks] == ["depthwise_conv+ekfac", "einsum_dense",
                                             "scale_shift", "dense+ekfac"]
    x = rng.normal(size=(8, 3, 4, 2)).astype("float32")
    result = opt.step(x, rng.integers(0, 3, size=8).astype("int32"))
    assert np.isfinite(float(result["loss"]))
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0


# ------------------------------------------------------------- training
def test_fit_trains_with_ekfac(rng):
    x, y = _data(rng, 512)
    model = _mlp()
    opt = tf_kfac.KFAC(curvature="ekfac", seed=0)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    assert history["accuracy"][-1] > 0.75
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    assert int(opt._kfac.state.inverse_updates.numpy()) >= 3
    for block in opt._blocks:
        for variable in block.state:
            assert np.all(np.isfinite(variable.numpy())), variable.path


@pytest.mark.parametrize("adapt_gamma", [False, True])
def test_adaptive_mode_trains_with_ekfac(adapt_gamma, rng):
    """The adaptive rule sees only directions: EKFAC's work there, and with
    `adapt_gamma` each γ candidate's refresh stores its own δ = γ²."""
    x, y = _data(rng, 256)
    model = _mlp()
    opt = tf_kfac.KFAC(curvature="ekfac", adaptive=True, adapt_gamma=adapt_gamma,
                       gamma_adaptation_interval=4, seed=0)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=64, epochs=6, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    if adapt_gamma:  # γ changes only on the steps that choose it, which refresh
        gamma = float(opt._kfac.state.gamma.numpy())  # relative to √c, c = 1
        for block in opt._blocks:
            np.testing.assert_allclose(float(block.damping.numpy()), gamma ** 2, rtol=1e-5)


def test_a_non_finite_eigendecomposition_keeps_the_previous_basis(monkeypatch, rng):
    """A refresh whose eigh is not finite keeps the last basis and is not counted."""
    x, y = _data(rng, 32)
    model = _mlp()
    opt = tf_kfac.KFAC(curvature="ekfac", inverse_update_interval=2, seed=0)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), run_eagerly=True)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)  # iteration 0: first refresh
    model.fit(x[8:16], y[8:16], batch_size=8, verbose=0)  # iteration 1: none
    kept = [v.numpy().copy() for b in opt._blocks for v in b.refreshed]
    original = ekfac.eigenbasis

    def poisoned(factor):
        values, vectors = original(factor)
        return values * np.nan, vectors

    monkeypatch.setattr(ekfac, "eigenbasis", poisoned)
    weights = model.get_weights()
    model.fit(x[16:24], y[16:24], batch_size=8, verbose=0)  # iteration 2: refresh fails
    now = [v.numpy() for b in opt._blocks for v in b.refreshed]
    assert int(opt._kfac.state.inverse_updates.numpy()) == 1
    assert int(opt._kfac.state.skipped_steps.numpy()) == 0
    for old, new in zip(kept, now, strict=True):
        np.testing.assert_array_equal(new, old)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, model.get_weights(),
                                                         strict=True))


def test_a_nan_factor_does_not_raise_in_eigh():
    """`tf.linalg.eigh` raises on NaN; the block's eigenbasis returns NaN instead."""
    factor = np.eye(3, dtype="float32")
    factor[1, 0] = factor[0, 1] = np.nan
    values, vectors = ekfac.eigenbasis(tf.constant(factor))
    assert not np.any(np.isfinite(values.numpy()))
    assert not np.any(np.isfinite(vectors.numpy()))


# ------------------------------------------------------- state and config
def test_config_carries_curvature_and_rejects_unknown_values():
    opt = tf_kfac.KFAC(curvature="ekfac", seed=1)
    config = opt.get_config()
    assert config["curvature"] == "ekfac"
    assert tf_kfac.KFAC.from_config(config).curvature == "ekfac"
    assert tf_kfac.KFAC(seed=1).get_config()["curvature"] == "kfac"
    for bad in ("EKFAC", "eigen", None, 1):
        with pytest.raises(ValueError, match="`curvature` must be one of 'kfac', 'ekfac'"):
            tf_kfac.KFAC(curvature=bad)


def test_keras_file_resumes_ekfac_exactly(tmp_path, rng):
    """Save mid-run (not on a refresh step, S in the current basis), load, continue:
    the weights and every optimizer variable equal the uninterrupted run's."""
    x, y = _data(rng, 64)

    def fit(model, epochs):
        model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)

    model = _mlp()
    model.compile(optimizer=tf_kfac.KFAC(curvature="ekfac", inverse_update_interval=6,
                                         factor_update_interval=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit(model, 1)  # 8 steps: the basis of step 6, S measured in it at step 6
    assert int(model.optimizer.iterations) % 6 != 0
    model.save(tmp_path / "run.keras")
    saved = [v.numpy().copy() for v in model.optimizer.variables]
    assert any("ekfac_S" in v.path for v in model.optimizer.variables)
    fit(model, 2)
    loaded = keras.models.load_model(tmp_path / "run.keras")
    assert loaded.optimizer.curvature == "ekfac"
    for variable, value in zip(loaded.optimizer.variables, saved, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    fit(loaded, 2)
    for actual, expected in zip(loaded.optimizer.variables, model.optimizer.variables,
                                strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=expected.path)
    for actual, expected in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_default_curvature_keeps_the_kfac_variable_order():
    """curvature="kfac" creates exactly K-FAC's variables (0.1 files load by position)."""
    model = _mlp()
    model.compile(optimizer=tf_kfac.KFAC(seed=0), loss="sparse_categorical_crossentropy")
    model.optimizer.attach(model)
    names = [v.path.rsplit("/", 1)[-1] for v in model.optimizer.variables]
    assert not any("ekfac" in n for n in names)
    block_names = [n for n in names if "kfac_A" in n or "kfac_G" in n]
    assert [n.split("dense")[-1].split("_kfac_")[-1] for n in block_names] == [
        "A", "G", "A_inverse", "G_inverse"] * 2
