"""The loss side of Keras masks (docs/design.md §3 "Masks", §6 oracle 18).

When the model's output carries a Keras mask (a per-position output after
Embedding(mask_zero=True) or Masking), Keras's loss merges the mask into the sample
weights: a padded output weighs nothing and, with the default reduction, the loss is
the mean over the real positions of the batch. The curvature is that of this masked
objective for every estimator. The references are Keras's own loss on Keras's own
forward pass, `tf.GradientTape` Jacobians and dense NumPy matrices; never tf_kfac's
arithmetic. The negative controls are the same brute force on the unmasked loss (the
mean over every position, padded outputs included) and the scale that counts every
position, which is what tf_kfac computed before it read the output's mask.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac
from tf_kfac import _keras_internals

TOL = 1e-4
VOCAB, CLASSES, OUTPUTS = 6, 3, 2


class _WithMask(keras.layers.Layer):
    """Hands its input on, carrying the Keras mask it is called with."""

    def __init__(self):
        super().__init__()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        return inputs


def _loss(kind, reduction="sum_over_batch_size"):
    if kind == "sce":
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction, dtype="float64")
    return keras.losses.MeanSquaredError(reduction=reduction, dtype="float64")


def _oracle_sees_masks() -> bool:
    """Whether this Keras attaches the mask `_WithMask` is called with to its eager
    output, so that the oracle's loss is Keras's masked loss (Keras 3.10 does not)."""
    out = _WithMask()(tf.zeros((1, 2, 1)), mask=tf.constant([[True, False]]))
    return _keras_internals.keras_mask(out) is not None


needs_masked_oracle = pytest.mark.skipif(
    not _oracle_sees_masks(),
    reason="this Keras release attaches no mask to an eager layer's output, so the "
           "oracle cannot build Keras's masked loss from its own forward pass")


def _keras_loss(loss, y, z, mask, sample_weight):
    """Keras's loss on the output z carrying `mask` (None: the unmasked loss)."""
    if mask is not None:
        z = _WithMask()(z, mask=tf.constant(mask))
    return loss(tf.constant(y), z, sample_weight=sample_weight)


def _jacobians(model, x, variables):
    """z = model(x) in float64 and ∂z/∂v for each variable, as (outputs, size) arrays
    (the columns in the order of W̄'s row-major vec)."""
    with tf.GradientTape(persistent=True) as tape:
        z = model(x, training=True)
    # Without pfor: TensorFlow 2.18's pfor aborts the process on the LSTM's loop.
    return z.numpy().astype(np.float64), [
        tf.reshape(tape.jacobian(z, v, experimental_use_pfor=False),
                   [tf.size(z), -1]).numpy().astype(np.float64) for v in variables]


def _output_hessian(loss, y, z, mask, sample_weight=None):
    """The dense Hessian of Keras's loss in the outputs z, with the output's mask (or
    without it: the negative control)."""
    z0 = tf.constant(z)
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = _keras_loss(loss, y, z0, mask, sample_weight)
        dz = inner.gradient(h, z0)
    return outer.jacobian(dz, z0).numpy().reshape(z.size, -1)


def _ggn(model, x, y, loss, mask, variables, sample_weight=None):
    """Jᵀ H J over the concatenated `variables`, masked and unmasked."""
    z, jacobians = _jacobians(model, x, variables)
    jac = np.concatenate(jacobians, axis=1)
    return [jac.T @ _output_hessian(loss, y, z, m, sample_weight) @ jac
            for m in (mask, None)]


def _kfac(model, loss, x, y, fisher, sample_weight=None, **kwargs):
    """One custom-loop step with factor_decay=0: the factors are this batch's."""
    opt = tf_kfac.KFAC(fisher=fisher, seed=3, learning_rate=1e-3, momentum=0.0,
                       kl_clip=None, factor_decay=0.0, **kwargs)
    opt.attach(model, loss=loss)
    logs = opt.step(x, y, sample_weight=sample_weight)
    return opt, logs


def _pair(opt, layer):
    """(A, G) as float64 arrays: an Embedding's A as a diagonal matrix, an LSTM's
    input pair (its kernel and bias, the block of W̄ = [kernel; bias])."""
    factors = opt.kronecker_factors(layer)
    if isinstance(layer, keras.layers.LSTM):
        factors = factors[0]
    a, g = (np.asarray(f, np.float64) for f in factors)
    return (np.diag(a) if isinstance(layer, keras.layers.Embedding) else a), g


def _lstm_model(positions, outputs):
    """Embedding(mask_zero=True) → LSTM(return_sequences) → Dense per position. The
    LSTM carries its output through padded steps, so the padded outputs depend on the
    real ones' weights."""
    tokens = keras.Input((positions,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 3, mask_zero=True, name="embedding",
                               embeddings_initializer=keras.initializers.RandomNormal(
                                   stddev=1.0))(tokens)
    h = keras.layers.LSTM(3, return_sequences=True, name="lstm")(h)
    return keras.Model(tokens, keras.layers.Dense(outputs, name="head")(h))


def _masking_model(positions, features):
    """Masking → Dense(tanh) → Dense per position: the mask of the rows of zeros."""
    inputs = keras.Input((positions, features))
    h = keras.layers.Masking(0.0)(inputs)
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(h)
    return keras.Model(inputs, keras.layers.Dense(OUTPUTS, name="head")(h))


def _blocks(model):
    """(layer, its variables in the order of W̄'s row-major vec) of every block that
    `_pair` reads."""
    blocks = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Embedding):
            blocks.append((layer, [layer.embeddings]))
        elif isinstance(layer, keras.layers.LSTM):
            blocks.append((layer, [layer.cell.kernel, layer.cell.bias]))
        elif isinstance(layer, keras.layers.Dense):
            blocks.append((layer, [layer.kernel, layer.bias]))
    return blocks


# ------------------------------------------------------- the exact oracle, B = 1

def _one_real_token(weights=None):
    """B = 1, 4 positions, one real token, a fresh LSTM model with cross-entropy per
    position: (model, x, y, {block: (the GGN of Keras's masked loss, the curvature
    tf_kfac computed before it read the output's mask)}). The latter is the GGN of the
    unmasked loss (the mean over every position) for the Embedding and the LSTM, which
    see the padded outputs through the output the LSTM carries over padded steps. The
    head's own mask drops its padded rows, so for it the latter is the masked GGN with
    the old scale: c = 1/T, and the example's mean weight for the real position's."""
    x = np.array([[0, 4, 0, 0]], "int32")
    mask = x != 0
    y = np.array([[1, 2, 0, 1]], "int32")
    model = _lstm_model(x.shape[1], CLASSES)
    blocks = _blocks(model)
    z, jacobians = _jacobians(model, x, [v for _, variables in blocks for v in variables])
    hessians = [_output_hessian(_loss("sce"), y, z, m, weights) for m in (mask, None)]
    old_scale = 1.0 / x.shape[1]
    if weights is not None:
        old_scale *= weights.mean() / weights[mask].item()
    ggns, start = {}, 0
    for layer, variables in blocks:
        jac = np.concatenate(jacobians[start:start + len(variables)], axis=1)
        start += len(variables)
        oracle, unmasked = (jac.T @ hess @ jac for hess in hessians)
        ggns[layer.name] = oracle, (old_scale * oracle if layer.name == "head" else unmasked)
    return model, x, y, ggns


@needs_masked_oracle
@pytest.mark.parametrize("weighted", [False, True])
def test_one_real_position_gives_the_exact_ggn_of_the_masked_loss(weighted, rel_err):
    """B = 1, one real token among padding, sparse cross-entropy per position,
    fisher="exact": the Embedding's kron(diag A, G), the LSTM's input pair and the
    head's kron(A, G) equal the brute-force GGN blocks of Keras's masked loss (c = 1:
    Keras averages over the one real position). With temporal sample weights, the
    weights of the padded positions count for nothing. Negative control: the curvature
    that counts the padded outputs (`_one_real_token`) is more than 200 tolerances from
    every block."""
    weights = np.array([[5.0, 0.7, 3.0, 2.0]], "float32") if weighted else None
    model, x, y, ggns = _one_real_token(weights)
    opt, _ = _kfac(model, _loss("sce"), x, y, "exact", weights)
    for layer, _ in _blocks(model):
        a, g = _pair(opt, layer)
        oracle, old = ggns[layer.name]
        assert np.abs(oracle).max() > 1e-3, layer.name
        assert rel_err(np.kron(a, g), oracle) < TOL, layer.name
        assert rel_err(old, oracle) > 200 * TOL, layer.name


# --------------------------------------------- the exact oracle, B = 2 (mse head)

CASES = {
    "embedding-lstm": ("lstm", None, "sum_over_batch_size"),
    "masking, weights (B, 1)": ("masking", "per-example", "sum_over_batch_size"),
    "masking, sum reduction": ("masking", None, "sum"),
}


def _case_data(source, rng):
    """Two examples of 4 positions with 3 and 1 real positions (padding in between)."""
    positions = 4
    mask = np.array([[True, True, False, True], [False, False, True, False]])
    if source == "lstm":
        x = np.where(mask, rng.integers(1, VOCAB, mask.shape), 0).astype("int32")
        model = _lstm_model(positions, OUTPUTS)
    else:
        x = (rng.normal(size=(2, positions, 3)) * mask[..., None]).astype("float32")
        model = _masking_model(positions, 3)
    y = rng.normal(size=(2, positions, OUTPUTS)).astype("float32")
    return model, x, y, mask


@needs_masked_oracle
@pytest.mark.parametrize("case", list(CASES))
def test_head_block_is_the_exact_ggn_of_the_masked_loss(case, rng, rel_err):
    """B = 2 with 3 and 1 real positions, mse per position, fisher="exact": the head's
    output Hessian is constant, so its kron(A, G) is the GGN block of Keras's masked
    loss at any B: with the default reduction (mean over the 4 real positions), with
    per-example weights of shape (B, 1), and with the sum reduction. Negative controls:
    the GGN of the unmasked loss, and the scale counting every position (the oracle's
    block times 4/8, what tf_kfac computed before for the mean reductions)."""
    source, weighting, reduction = CASES[case]
    model, x, y, mask = _case_data(source, rng)
    weights = np.array([[0.5], [2.0]], "float32") if weighting else None
    loss = _loss("mse", reduction)
    head = model.get_layer("head")
    oracle, unmasked = _ggn(model, x, y, loss, mask, [head.kernel, head.bias], weights)
    opt, _ = _kfac(model, loss, x, y, "exact", weights)
    a, g = _pair(opt, head)
    assert rel_err(np.kron(a, g), oracle) < TOL
    assert rel_err(unmasked, oracle) > 200 * TOL
    if reduction != "sum":
        assert rel_err(oracle * mask.mean(), oracle) > 0.1


# ------------------------------------------------------------ sampled, empirical

@needs_masked_oracle
def test_sampled_factors_average_to_the_exact_ggn_of_the_masked_loss(rel_err):
    """fisher="sampled" on 1024 copies of the one-real-token example: the factors of
    identical examples are those of one, so every block's kron(A, G) averages to the
    brute-force GGN of Keras's masked loss (the draws at padded outputs count for
    nothing). Negative control: the curvature that counts the padded outputs, which the
    draws at every position with c = 1/T estimate."""
    model, x, y, ggns = _one_real_token()
    copies = 1024
    opt, _ = _kfac(model, _loss("sce"), np.tile(x, (copies, 1)), np.tile(y, (copies, 1)),
                   "sampled")
    for layer, _ in _blocks(model):
        a, g = _pair(opt, layer)
        oracle, old = ggns[layer.name]
        assert rel_err(np.kron(a, g), oracle) < 0.1, layer.name
        assert rel_err(old, oracle) > 0.2, layer.name


@needs_masked_oracle
def test_empirical_g_of_the_head_is_the_masked_per_example_outer_products(rng, rel_err):
    """fisher="empirical", B = 2 with weights (B, 1), mse per position: the head's G is
    c·(1/B) Σᵢ wᵢ (1/Tᵢ) Σ_real gᵢₜgᵢₜᵀ with gᵢₜ = (B/(c·wᵢ))·∂h/∂zᵢₜ, the gradient of
    Keras's masked loss h on its forward pass, and c read off Keras's loss value
    (h = (1/B) Σᵢ wᵢ c Σ_real ‖zᵢₜ − yᵢₜ‖²). Negative control: the scale counting every
    position, which squares the mask's rescaling (8/4 times the reference)."""
    model, x, y, mask = _case_data("masking", rng)
    weights = np.array([[0.5], [2.0]], "float32")
    loss = _loss("mse")
    z = tf.constant(model(x, training=True).numpy().astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(z)
        h = _keras_loss(loss, y, z, mask, weights)
    grad = tape.gradient(h, z).numpy()
    batch, w, real = len(x), weights[:, 0], mask.sum(axis=1)
    squares = ((z.numpy() - y) ** 2).sum(axis=-1)
    c = batch * float(h) / float((w[:, None] * mask * squares).sum())
    g_ref = np.zeros((OUTPUTS, OUTPUTS))
    for i in range(batch):
        for t in np.flatnonzero(mask[i]):
            row = batch * grad[i, t] / (c * w[i])
            g_ref += c * w[i] * np.outer(row, row) / (batch * real[i])
    opt, _ = _kfac(model, loss, x, y, "empirical", weights)
    _, g = _pair(opt, model.get_layer("head"))
    assert rel_err(g, g_ref) < TOL
    assert rel_err(g_ref * mask.size / mask.sum(), g_ref) > 0.1


# ------------------------------------------------------------------ adaptive mode

@needs_masked_oracle
def test_adaptive_quadratic_model_uses_the_masked_fisher(rng):
    """adaptive=True, first step, no momentum: α minimises the quadratic model along the
    proposal, so the update δ satisfies δᵀ(F + λc)δ = −∇hᵀδ with F the brute-force GGN
    of Keras's masked loss, ∇h its gradient (tf.GradientTape on Keras's loss) and c read
    off Keras's loss value. Negative control: F of the unmasked loss."""
    model, x, y, mask = _case_data("masking", rng)
    loss = _loss("mse")
    variables = model.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    fisher, unmasked = _ggn(model, x, y, loss, mask, variables)
    with tf.GradientTape() as tape:
        h = _keras_loss(loss, y, tf.cast(model(x, training=True), tf.float64), mask, None)
    grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(h, variables)])
    z = model(x, training=True).numpy().astype(np.float64)
    c = len(x) * float(h) / float((mask * ((z - y) ** 2).sum(axis=-1)).sum())
    damping = 1e-3
    _kfac(model, loss, x, y, "exact", adaptive=True, damping=damping)
    delta = np.concatenate([(v.numpy() - b).ravel() for v, b in zip(variables, before,
                                                                    strict=True)])
    assert np.linalg.norm(delta) > 0
    predicted = -grad @ delta
    curvature = delta @ fisher @ delta + damping * c * delta @ delta
    assert abs(curvature - predicted) < 1e-3 * abs(predicted)
    control = delta @ unmasked @ delta + damping * c * delta @ delta
    assert abs(control - predicted) > 0.05 * abs(predicted)


# ------------------------------------------------------------------ errors, fit

def test_per_example_weights_of_rank_one_with_a_masked_sequence_are_a_clear_error(rng):
    """Keras multiplies (B,) sample weights with a (B, T) output mask along the last
    axis (an error, or example i's weight on position i when B = T); K-FAC says which
    shapes to pass instead, before any factor is written."""
    model, x, y, _ = _case_data("masking", rng)
    opt = tf_kfac.KFAC(fisher="exact", seed=0)
    opt.attach(model, loss="mse")
    with pytest.raises(ValueError, match=r"\(batch, 1\)"):
        opt.step(x, y, sample_weight=np.array([1.0, 2.0], "float32"))
    a, g = opt.kronecker_factors(model.get_layer("head"))
    assert not np.any(np.asarray(a)) and not np.any(np.asarray(g))


def test_output_mask_not_of_the_loss_shape_is_a_clear_error(rng):
    """A mask with one entry per output entry (the loss has one term per position)
    raises a ValueError that says which shape K-FAC reads."""

    class EntryMask(keras.layers.Layer):
        def call(self, inputs):
            return inputs

        def compute_mask(self, inputs, mask=None):
            return keras.ops.not_equal(inputs, 0.0)

    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, EntryMask()(keras.layers.Dense(OUTPUTS, name="head")(inputs)))
    opt = tf_kfac.KFAC(fisher="exact", seed=0)
    opt.attach(model, loss="mse")
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    with pytest.raises(ValueError, match="without its last axis"):
        opt.step(x, np.zeros((2, 4, OUTPUTS), "float32"))


def test_ignore_class_is_refused_for_the_model_based_estimators():
    """SparseCategoricalCrossentropy(ignore_class=...) masks the loss by the targets,
    which the sampled and exact estimators never see: a clear error, not a wrong G."""
    model = _lstm_model(4, CLASSES)
    for fisher in ("exact", "sampled"):
        opt = tf_kfac.KFAC(fisher=fisher)
        with pytest.raises(ValueError, match="ignore_class"):
            opt.attach(model, loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=0))


def test_fit_trains_a_masked_sequence_output(rng):
    """Embedding(mask_zero=True) → LSTM(return_sequences) → Dense per position, sparse
    cross-entropy, model.fit with the default sampled estimator and per-example weights
    of shape (B, 1): the loss falls, every K-FAC variable stays finite."""
    positions = 6
    x = rng.integers(1, VOCAB, (64, positions)).astype("int32")
    lengths = rng.integers(1, positions + 1, 64)
    x[np.arange(positions)[None] >= lengths[:, None]] = 0
    y = (x % CLASSES).astype("int32")
    keras.utils.set_random_seed(1)
    model = _lstm_model(positions, CLASSES)
    opt = tf_kfac.KFAC(seed=0, factor_update_interval=1, inverse_update_interval=2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    weights = rng.uniform(0.5, 2.0, (64, 1)).astype("float32")
    history = model.fit(x, y, sample_weight=weights, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables)
