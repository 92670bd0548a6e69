"""The preconditioned update against a dense NumPy solve (docs/design.md §6, oracle 4).

One step from fresh optimizer state (so momentum plays no part) must move each
Dense/Conv2D layer's W̄ = [K; b] by exactly −lr·ν·V with

    vec(V) = (A_d ⊗ G_d)⁻¹ vec(∇W̄ + ηW̄),  A_d = A + πγI,  G_d = G + (γ/π)I,
    γ = √(λ + η),  π = √((tr A / dim A) / (tr G / dim G)),

(row-major vec, A and G this batch's statistics as reported by `kronecker_factors`),
and every other trainable variable by −lr·ν·(∇w + ηw). ν is the KL-clip factor
min(1, √(κ / (lr² Σ⟨V, ∇⟩))) over all variables, or 1 without clipping. The
gradients come from an independent `tf.GradientTape` on Keras's own loss.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac.blocks import EmbeddingBlock, FirstOrderBlock, KroneckerBlock, ScaleShiftBlock
from tf_kfac.linalg import pi_adjustment

BATCH, CLASSES = 6, 3
LR, DAMPING = 0.5, 0.05
TOL = 2e-4  # relative error of a float32 update against the float64 solve


def mlp():
    """Dense layers around a BatchNormalization (per-unit (γ, β) blocks)."""
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(5), keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"), keras.layers.Dense(CLASSES, activation="softmax")])


def convnet():
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(CLASSES, activation="softmax")])


def embedding_net():
    return keras.Sequential([
        keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
        keras.layers.Flatten(), keras.layers.Dense(CLASSES, activation="softmax")])


def prelu_net():
    """A PReLU's slopes have no curvature block: they take the first-order fallback."""
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(5), keras.layers.PReLU(),
        keras.layers.Dense(CLASSES, activation="softmax")])


MODELS = {"mlp": (mlp, (4,)), "convnet": (convnet, (6, 6, 2)), "embedding": (embedding_net, None),
          "prelu": (prelu_net, (4,))}

LOSS_FORMS = {
    "string": lambda: "sparse_categorical_crossentropy",
    "function": lambda: keras.losses.sparse_categorical_crossentropy,
    "object": keras.losses.SparseCategoricalCrossentropy,
}


def make_data(name, rng):
    shape = MODELS[name][1]
    if shape is None:
        x = rng.integers(0, 10, (BATCH, 3)).astype("int32")
    else:
        x = rng.normal(size=(BATCH, *shape)).astype("float32")
    return x, rng.integers(0, CLASSES, BATCH)


def as_matrix(values) -> np.ndarray:
    """[kernel, (bias)] as W̄: kernel reshaped (d_in, d_out), bias as the last row."""
    kernel = np.asarray(values[0], np.float64)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    if len(values) == 1:
        return kernel
    return np.concatenate([kernel, np.asarray(values[1], np.float64)[None]])


def run_one_step(name, driver, rng, *, l2_reg=0.0, kl_clip=None, loss_form="object",
                 loss_weight=None):
    """One K-FAC step; returns (optimizer, before, after, grads, logs) keyed by variable.

    `loss_form="mse"` fits the softmax outputs to one-hot targets with Keras's
    `mse`, whose scale is c = 1/CLASSES (times `loss_weight`).
    """
    model = MODELS[name][0]()
    x, y = make_data(name, rng)
    if loss_form == "mse":
        y = np.eye(CLASSES, dtype="float32")[y]
    with tf.GradientTape() as tape:
        objective = (keras.losses.MeanSquaredError() if loss_form == "mse"
                     else keras.losses.SparseCategoricalCrossentropy())
        loss = objective(y, model(x, training=True)) * (loss_weight or 1.0)
    variables = model.trainable_variables
    grads = {id(v): np.asarray(tf.convert_to_tensor(g), np.float64)
             for v, g in zip(variables, tape.gradient(loss, variables), strict=True)}
    before = {id(v): v.numpy().astype(np.float64) for v in variables}

    opt = tf_kfac.KFAC(learning_rate=LR, momentum=0.0, damping=DAMPING, l2_reg=l2_reg,
                       kl_clip=kl_clip, seed=11)
    if driver == "fit":
        loss_arg = "mse" if loss_form == "mse" else LOSS_FORMS[loss_form]()
        model.compile(optimizer=opt, loss=loss_arg, loss_weights=loss_weight)
        history = model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
        logs = {key: values[-1] for key, values in history.history.items()}
    else:
        opt.attach(model, loss=LOSS_FORMS[loss_form]())
        logs = {key: float(value) for key, value in opt.step(x, y).items()}
    assert logs["damping"] == pytest.approx(DAMPING)
    assert logs["skipped_steps"] == 0
    assert logs["loss"] == pytest.approx(float(loss), rel=1e-5)
    after = {id(v): v.numpy().astype(np.float64) for v in variables}
    return opt, model, before, after, grads, logs


def expected_directions(opt, model, before, grads, l2_reg, use_pi=True, loss_scale=1.0):
    """[(variables, V as one array, ∇ + ηw as one array)] per block, in float64.

    `use_pi=False` replaces π by 1 (plain factored damping), for a negative control.
    `loss_scale` is c: the damping is λ·c, and a fallback variable's V is (∇ + ηw)/c.
    """
    gamma = np.sqrt(DAMPING * loss_scale + l2_reg)
    covered, out = [], []
    for block in opt._blocks:
        ids = [id(v) for v in block.variables]
        covered += ids
        if isinstance(block, KroneckerBlock):
            assert isinstance(block.layer, (keras.layers.Dense, keras.layers.Conv2D))
            w = as_matrix([before[i] for i in ids])
            grad = as_matrix([grads[i] for i in ids]) + l2_reg * w
            a, g = (np.asarray(f, np.float64) for f in opt.kronecker_factors(block.layer))
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g))) if use_pi else 1.0
            a_damped = a + pi * gamma * np.eye(len(a))
            g_damped = g + gamma / pi * np.eye(len(g))
            v = np.linalg.solve(np.kron(a_damped, g_damped), grad.ravel()).reshape(grad.shape)
            out.append((ids, v, grad))
        elif isinstance(block, ScaleShiftBlock):
            # Per unit: (F_i + (λc + η)·I)⁻¹ (∇γᵢ, ∇βᵢ), no π (F_i is not a product).
            grad = np.stack([grads[i] + l2_reg * before[i] for i in ids], axis=-1)
            (f,) = (np.asarray(t, np.float64) for t in opt.kronecker_factors(block.layer))
            damped = f + gamma**2 * np.eye(f.shape[-1])
            v = np.stack([np.linalg.solve(damped[u], grad[u]) for u in range(len(grad))])
            for k, i in enumerate(ids):
                out.append(([i], v[:, k], grad[:, k]))
        elif isinstance(block, EmbeddingBlock):
            (i,) = ids
            grad = grads[i] + l2_reg * before[i]
            a, g = (np.asarray(f, np.float64) for f in opt.kronecker_factors(block.layer))
            pi = np.sqrt(np.mean(a) / (np.trace(g) / len(g))) if use_pi else 1.0
            g_damped = g + gamma / pi * np.eye(len(g))
            v = np.linalg.solve(g_damped.T, (grad / (a + pi * gamma)[:, None]).T).T
            out.append((ids, v, grad))
        else:
            assert isinstance(block, FirstOrderBlock)
            (i,) = ids
            grad = grads[i] + l2_reg * before[i]
            out.append((ids, grad / loss_scale, grad))
    assert sorted(covered) == sorted(id(v) for v in model.trainable_variables)
    return out


def check_update(opt, model, before, after, grads, l2_reg=0.0, kl_clip=None, rel_err=None,
                 loss_scale=1.0):
    """Asserts every variable moved by −lr·ν·V; returns the reference ν."""
    directions = expected_directions(opt, model, before, grads, l2_reg, loss_scale=loss_scale)
    nu = 1.0
    if kl_clip is not None:
        inner = sum(float(np.sum(v * g)) for _, v, g in directions)
        nu = min(1.0, np.sqrt(kl_clip * loss_scale / (LR**2 * inner)))
    for ids, v, _ in directions:
        if len(ids) == 1 and v.shape == before[ids[0]].shape:
            moved = after[ids[0]] - before[ids[0]]
        else:
            moved = as_matrix([after[i] for i in ids]) - as_matrix([before[i] for i in ids])
        assert rel_err(moved, -LR * nu * v) < TOL
    return nu


@pytest.mark.parametrize("driver", ["fit", "step"])
@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_one_step_is_the_damped_kronecker_solve(name, driver, rng, rel_err):
    """momentum 0, no KL-clip, no L2: ΔW̄ = −lr·(A + π√λI)⁻¹ ∇W̄ (G + √λ/π I)⁻¹ for
    Dense and Conv2D (dense solve over kron(A_d, G_d)); BatchNormalization's gamma
    and beta move by −lr·∇ (the first-order fallback)."""
    result = run_one_step(name, driver, rng)
    check_update(*result[:5], rel_err=rel_err)
    # Negative control: without π the same comparison fails, so π is really checked.
    opt, model, before, after, grads = result[:5]
    misses = [rel_err(as_matrix([after[i] for i in ids]) - as_matrix([before[i] for i in ids]),
                      -LR * v)
              for ids, v, _ in expected_directions(opt, model, before, grads, 0.0, use_pi=False)
              if len(ids) == 2]
    assert max(misses) > 10 * TOL


@pytest.mark.parametrize(("name", "driver"), [("mlp", "step"), ("convnet", "fit")])
def test_l2_reg_enters_gradient_and_damping(name, driver, rng, rel_err):
    """l2_reg = η: the gradient becomes ∇ + ηw for every variable and γ = √(λ + η)."""
    eta = 0.02
    result = run_one_step(name, driver, rng, l2_reg=eta)
    check_update(*result[:5], l2_reg=eta, rel_err=rel_err)


@pytest.mark.parametrize(("kl_clip", "driver"), [(0.02, "fit"), (10.0, "step")],
                         ids=["clipping", "not-clipping"])
def test_kl_clip_scales_the_whole_update(kl_clip, driver, rng, rel_err):
    """With kl_clip = κ the whole update (Kronecker and fallback) is scaled by
    ν = min(1, √(κ / (lr² Σ⟨V, ∇⟩))), and the "kl_scale" log reports ν."""
    opt, model, before, after, grads, logs = run_one_step("mlp", driver, rng, kl_clip=kl_clip)
    nu = check_update(opt, model, before, after, grads, kl_clip=kl_clip, rel_err=rel_err)
    assert logs["kl_scale"] == pytest.approx(nu, rel=1e-4)
    assert (nu < 0.5) if kl_clip < 1 else (nu == 1.0)


@pytest.mark.parametrize(("l2_reg", "kl_clip", "driver"),
                         [(0.0, None, "step"), (0.0, 1e-4, "fit"), (0.02, None, "step")],
                         ids=["plain", "kl_clip", "l2_reg"])
@pytest.mark.parametrize("name", ["embedding", "prelu"])
def test_embedding_and_fallback_steps(name, l2_reg, kl_clip, driver, rng, rel_err):
    """An Embedding (sparse IndexedSlices gradient) moves by −lr·ν·V with V =
    diag(A + πγ)⁻¹ (∇ + ηw) (G + γ/π·I)⁻¹, and a PReLU's slopes (no block) by the
    fallback −lr·ν·(∇ + ηw), with KL-clipping and L2 as for every other variable.
    (A regression test: KL-clipping crashed on the Embedding's sparse gradient.)"""
    result = run_one_step(name, driver, rng, l2_reg=l2_reg, kl_clip=kl_clip)
    opt, model = result[:2]
    kind = EmbeddingBlock if name == "embedding" else FirstOrderBlock
    (block,) = [b for b in opt._blocks if isinstance(b, kind)]
    assert block.variables[0] is model.layers[0 if name == "embedding" else 1].weights[0]
    check_update(*result[:5], l2_reg=l2_reg, kl_clip=kl_clip, rel_err=rel_err)


@pytest.mark.parametrize("loss_form", list(LOSS_FORMS))
def test_step_accepts_every_documented_loss_form(loss_form, rng, rel_err):
    """`attach(model, loss=...)` + `step` takes a loss name, a loss function or a Loss
    object, and each gives Keras's mean-over-batch objective and the same update.
    (A regression test: names and functions crashed.)"""
    result = run_one_step("mlp", "step", rng, loss_form=loss_form)
    check_update(*result[:5], rel_err=rel_err)


@pytest.mark.parametrize("loss_weight", [None, 7.0])
def test_damping_kl_bound_and_fallback_are_relative_to_the_loss_scale(loss_weight, rng,
                                                                       rel_err):
    """Keras `mse` over 3 outputs (× a loss weight) has c = w/3: the step uses the
    damping λ·c, the KL-clip bound κ·c and the fallback direction ∇/c."""
    kl_clip = 0.02
    c = (loss_weight or 1.0) / CLASSES
    result = run_one_step("prelu", "fit", rng, loss_form="mse", kl_clip=kl_clip,
                          loss_weight=loss_weight)
    nu = check_update(*result[:5], kl_clip=kl_clip, rel_err=rel_err, loss_scale=c)
    assert result[-1]["kl_scale"] == pytest.approx(nu, rel=1e-4)
    # Negative control: the same step read with absolute constants (c = 1) is rejected.
    with pytest.raises(AssertionError):
        check_update(*result[:5], kl_clip=kl_clip, rel_err=rel_err, loss_scale=1.0)


def test_pi_adjustment_matches_its_definition(rng):
    """π = √((tr A / dim A) / (tr G / dim G)) for SPD factors of different sizes."""
    a, g = rng.normal(size=(5, 5)), rng.normal(size=(3, 3))
    a, g = a @ a.T + 0.1 * np.eye(5), 0.01 * (g @ g.T)
    expected = np.sqrt((np.trace(a) / 5) / (np.trace(g) / 3))
    got = pi_adjustment(tf.constant(a, tf.float32), tf.constant(g, tf.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_factor_and_inverse_intervals():
    """Factors change only on every factor_update_interval-th step (and the first),
    inverses only once every inverse_update_interval steps, at the layer's phase (and
    on the first); the
    skipped steps keep them exactly and still train the weights."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6 * 8, 3)).astype("float32")
    y = rng.normal(size=(6 * 8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(2)])
    opt = tf_kfac.KFAC(factor_update_interval=3, inverse_update_interval=4, factor_decay=0.0,
                       fisher="exact")
    model.compile(optimizer=opt, loss="mse")
    opt.attach(model)
    layer = model.layers[0]
    block = next(b for b in opt._blocks if getattr(b, "layer", None) is layer)
    snapshots = []

    def record(batch, logs):
        snapshots.append((block.a_factor.numpy().copy(), block.a_inverse.numpy().copy(),
                          layer.kernel.numpy().copy()))

    callback = keras.callbacks.LambdaCallback(on_train_batch_end=record)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    a = [s[0] for s in snapshots]
    inv = [s[1] for s in snapshots]
    kernels = [s[2] for s in snapshots]
    # Steps 0..5: factors refresh on steps 0 and 3. Inverses: every layer on step 0,
    # then from step 4 on each at its phase of the interval of 4. The refresh costs (d³
    # per factor) are 4³ + 4³ = 128 for this layer and 5³ + 2³ = 133 for the second,
    # which, the larger, takes phase 0 (step 4); this one takes phase 1 (step 5).
    for step in range(1, 6):
        same_a = np.array_equal(a[step], a[step - 1])
        same_inv = np.array_equal(inv[step], inv[step - 1])
        assert same_a == (step != 3), step
        assert same_inv == (step != 5), step
        assert not np.array_equal(kernels[step], kernels[step - 1]), step
    assert int(opt._kfac.state.factor_updates.numpy()) == 2
    # Steps with a refresh: 0 (all), 4 (the second layer), 5 (this one).
    assert int(opt._kfac.state.inverse_updates.numpy()) == 3


def test_refreshes_are_spread_over_the_interval():
    """Four Dense layers with inverse_update_interval=4: step 0 refreshes every layer;
    from step 4 on exactly one layer per step, each once per 4 steps, in the order of
    their refresh costs (d³ per factor): 17³+12³ = 6641 (second layer, phase 0),
    4³+16³ = 4160 (first, phase 1), 13³+8³ = 2709 (third, phase 2), 9³+2³ = 737
    (fourth, phase 3). Steps 1 to 3 refresh nothing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12 * 8, 3)).astype("float32")
    y = rng.normal(size=(12 * 8, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(12, activation="tanh"),
                              keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    opt = tf_kfac.KFAC(factor_update_interval=1, inverse_update_interval=4, fisher="exact")
    model.compile(optimizer=opt, loss="mse")
    opt.attach(model)
    snapshots = []

    def record(batch, logs):
        blocks = opt._kfac.estimator.curvature_blocks
        snapshots.append([b.a_inverse.numpy().copy() for b in blocks])

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    assert [b.layer for b in opt._kfac.estimator.curvature_blocks] == model.layers
    order = [1, 0, 2, 3]  # the layer refreshed at phases 0, 1, 2, 3
    for step in range(1, 12):
        changed = [i for i in range(4)
                   if not np.array_equal(snapshots[step][i], snapshots[step - 1][i])]
        assert changed == ([] if step < 4 else [order[step % 4]]), step
    assert int(opt._kfac.estimator.inversions.numpy()) == 4 + 8
