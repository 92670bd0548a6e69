"""Kronecker factors of the layer kinds beyond Dense/Conv2D, against brute force.

Covers weight sharing over positions (the "expand" and "reduce" flavours of Eschenhagen
et al., NeurIPS 2023) for Dense and EinsumDense, Conv1D/Conv3D (KFC), and DepthwiseConv2D's
per-channel factors (docs/design.md §3 and §6, oracles 2 and 5).

The references never go through tf_kfac: a hand-written float64 forward pass with the
layers' weights (checked against the layers' own outputs), `tf.GradientTape` Jacobians,
Hessians of Keras's own loss functions, and explicit Python loops over positions and
patches. The curvature is that of the objective h exactly as Keras computes it (the loss's
mean over the batch and over the positions), over the row-major vec of W̄ = [K; b].

With T positions per example, rows ā_{it} (the 1 last when there is a bias) and
pre-activation gradients g_{it}:
  expand: A = (1/B) Σᵢ Σₜ ā_{it}ā_{it}ᵀ,  G = c·(1/B) Σᵢ (1/T) Σₜ E[g_{it}g_{it}ᵀ];
  reduce: A = (1/B) Σᵢ āᵢāᵢᵀ with āᵢ = (1/T) Σₜ ā_{it},  G = c·(1/B) Σᵢ E[ĝᵢĝᵢᵀ], ĝᵢ = Σₜ g_{it}.
Each flavour's kron(A, G) is the exact GGN block in its own deep-linear setting at B > 1
(expand: layers applied per position, mse over positions; reduce: a layer on positions,
global average pooling, a layer, mse), and not in the other's: those are the negative
controls that show the comparisons can fail.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

TOL = 1e-4  # relative error allowed between float32 factors and float64 references
WRONG = 100 * TOL  # a negative control must be at least this far off

ACTIVATIONS = {"linear": tf.identity, "tanh": tf.tanh}

LOSSES = {  # name: (the loss given to K-FAC, Keras's own per-example function)
    "mse": (keras.losses.MeanSquaredError, keras.losses.mean_squared_error),
    "logits-sparse_ce": (
        functools.partial(keras.losses.SparseCategoricalCrossentropy, from_logits=True),
        functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True)),
}


# ------------------------------------------------------------------------- helpers

def f64(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, np.float64)


def with_ones(rows: np.ndarray) -> np.ndarray:
    return np.concatenate([rows, np.ones_like(rows[..., :1])], axis=-1)


def wbar(layer) -> np.ndarray:
    """W̄ = [kernel reshaped (d_in, d_out); bias] in float64 (Dense and convolutions)."""
    kernel = f64(layer.kernel)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    if layer.bias is None:
        return kernel
    return np.concatenate([kernel, f64(layer.bias)[None]])


def kfac_step(model, loss, x, y, fisher, *, weight_sharing=None, seed=7):
    """One `KFAC.step` with factor_decay=0 (so the factors are this batch's).

    weight_sharing=None passes nothing, i.e. the default.
    """
    settings = dict(learning_rate=1e-3, momentum=0.0, kl_clip=None, factor_decay=0.0)
    if weight_sharing is not None:
        settings["weight_sharing"] = weight_sharing
    opt = tf_kfac.KFAC(fisher=fisher, seed=seed, **settings)
    opt.attach(model, loss=loss)
    logs = opt.step(x, y)
    return opt, logs


def factors_of(opt, layers):
    return [tuple(f64(t) for t in opt.kronecker_factors(layer)) for layer in layers]


# ------------------------------------------------- hand-written linear maps (float64)

class Linear(NamedTuple):
    """A layer as s = ā·W̄ on rows, written by hand.

    rows(a): the layer input (B, ...) as ā rows (B, T, d_in), without the 1;
    layout(s, a): the pre-activations (B, T, d_out) in the layer's output shape.
    """

    layer: keras.layers.Layer
    rows: Callable
    layout: Callable
    wbar: np.ndarray
    bias: bool
    activation: str


def dense_linear(layer) -> Linear:
    """A Dense layer acting on the last axis at every position."""
    d_in, d_out = layer.kernel.shape

    def rows(a):
        return tf.reshape(a, (a.shape[0], -1, d_in))

    def layout(s, a):
        return tf.reshape(s, (*a.shape[:-1], d_out))

    return Linear(layer, rows, layout, wbar(layer), layer.bias is not None,
                  layer.activation.__name__)


class EinsumSpec(NamedTuple):
    inputs: str  # input labels
    kernel: str  # kernel labels
    output: str  # output labels
    contracted: list  # kernel labels that are input labels, in kernel order
    out_only: list  # kernel labels that are not input labels, in kernel order
    positions: list  # input labels not in the kernel, in input order (batch first)


def einsum_spec(layer) -> EinsumSpec:
    operands, output = layer.equation.split("->")
    inputs, kernel = operands.split(",")
    contracted = [label for label in kernel if label in inputs]
    out_only = [label for label in kernel if label not in inputs]
    positions = [label for label in inputs if label not in kernel]
    assert sorted(output) == sorted(positions + out_only), layer.equation
    assert positions[0] == inputs[0] == output[0], layer.equation  # the batch axis
    return EinsumSpec(inputs, kernel, output, contracted, out_only, positions)


def einsum_wbar(layer) -> np.ndarray:
    """W̄ of an EinsumDense layer by the documented convention, in float64.

    The kernel transposed to (contracted labels, output-only labels), each in kernel order,
    reshaped (d_in, d_out); the bias transposed to the output-only labels' kernel order,
    flattened and appended as the last row.
    """
    spec = einsum_spec(layer)
    kernel = f64(layer.kernel)
    size = dict(zip(spec.kernel, kernel.shape, strict=True))
    order = spec.contracted + spec.out_only
    kernel = kernel.transpose([spec.kernel.index(label) for label in order])
    kernel = kernel.reshape(math.prod(size[label] for label in spec.contracted), -1)
    if layer.bias is None:
        return kernel
    # Keras keeps the bias in output order from the first bias label, with 1 for the others.
    first = min(spec.output.index(label) for label in layer.bias_axes)
    labels = [label for label in spec.output[first:] if label in layer.bias_axes]
    assert sorted(labels) == sorted(spec.out_only), (layer.equation, layer.bias_axes)
    bias = f64(layer.bias).reshape([size[label] for label in labels])
    bias = bias.transpose([labels.index(label) for label in spec.out_only]).reshape(-1)
    return np.concatenate([kernel, bias[None]])


def einsum_linear(layer) -> Linear:
    """An EinsumDense layer: rows over its position labels, columns over the rest."""
    spec = einsum_spec(layer)
    size = dict(zip(spec.kernel, layer.kernel.shape, strict=True))
    d_in = math.prod(size[label] for label in spec.contracted)

    def rows(a):
        order = spec.positions + spec.contracted
        a = tf.transpose(a, [spec.inputs.index(label) for label in order])
        return tf.reshape(a, (a.shape[0], -1, d_in))

    def layout(s, a):
        position_sizes = [a.shape[spec.inputs.index(label)] for label in spec.positions]
        s = tf.reshape(s, position_sizes + [size[label] for label in spec.out_only])
        labels = spec.positions + spec.out_only
        return tf.transpose(s, [labels.index(label) for label in spec.output])

    return Linear(layer, rows, layout, einsum_wbar(layer), layer.bias is not None,
                  layer.activation.__name__)


# ------------------------------------------------------------------ brute force

class Reference(NamedTuple):
    ggn: np.ndarray  # exact GGN block (1/B) Σᵢ Jᵢᵀ Hᵢ Jᵢ over row-major vec(W̄)
    rows: np.ndarray  # ā rows (B, T, d_in [+1]) from the hand-written forward pass
    q: np.ndarray  # (B, T, d_out, T, d_out): Mᵢᵀ (∂²h/∂zᵢ²) Mᵢ, Mᵢ = ∂zᵢ/∂sᵢ


def brute_force(net, loss_fn, x, y):
    """Exact GGN blocks and per-example curvature of `net` in float64.

    `net` is a list of `Linear` layers and plain functions (pooling, flattening). z is the
    network's output (its last layer is linear) and h(z) = the mean of Keras's
    `loss_fn(y, z)` over the batch and the positions, so the output Hessian carries the
    loss's scale c and the 1/B. Returns (objective, output z, [Reference] per Linear).
    """
    linears = [step for step in net if isinstance(step, Linear)]
    weights = [tf.Variable(step.wbar) for step in linears]
    records = []
    with tf.GradientTape(persistent=True) as tape:
        a = tf.constant(x, tf.float64)
        variables = iter(weights)
        for step in net:
            if not isinstance(step, Linear):
                a = step(a)
                continue
            w = next(variables)
            rows = step.rows(a)
            if step.bias:
                rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
            s = tf.einsum("btd,de->bte", rows, w)
            records.append((w, rows, s))
            a = ACTIVATIONS[step.activation](step.layout(s, a))
        z = a

    z0 = tf.constant(z)
    with tf.GradientTape() as outer:
        outer.watch(z0)
        with tf.GradientTape() as inner:
            inner.watch(z0)
            h = tf.reduce_mean(loss_fn(y, z0))
        dz = inner.gradient(h, z0)
    batch = z.shape[0]
    hess = outer.jacobian(dz, z0).numpy().reshape(batch, -1, batch, z.shape.num_elements() // batch)
    hess_flat = hess.reshape(z.shape.num_elements(), -1)

    refs = []
    for w, rows, s in records:
        jac = tape.jacobian(z, w).numpy().reshape(z.shape.num_elements(), -1)
        _, positions, d_out = s.shape
        m = tape.jacobian(z, s).numpy().reshape(batch, -1, batch, positions * d_out)
        q = np.stack([m[i, :, i].T @ hess[i, :, i] @ m[i, :, i] for i in range(batch)])
        refs.append(Reference(jac.T @ hess_flat @ jac, rows.numpy(),
                              q.reshape(batch, positions, d_out, positions, d_out)))
    del tape
    return float(h), z.numpy(), refs


def a_expand(ref):
    return np.einsum("btd,bte->de", ref.rows, ref.rows) / ref.rows.shape[0]


def a_reduce(ref):
    mean = ref.rows.mean(axis=1)
    return mean.T @ mean / ref.rows.shape[0]


def g_expand(ref):
    """c·(1/B) Σᵢ (1/T) Σₜ E[g_{it}g_{it}ᵀ]: the diagonal position blocks of Mᵀ H M, averaged."""
    return np.einsum("btdte->de", ref.q) / ref.q.shape[1]


def g_reduce(ref):
    """c·(1/B) Σᵢ E[ĝᵢĝᵢᵀ], ĝᵢ = Σₜ g_{it}: every position block of Mᵀ H M, summed."""
    return ref.q.sum(axis=(0, 1, 3))


FLAVOURS = {"expand": (a_expand, g_expand), "reduce": (a_reduce, g_reduce)}


def check_factors(rel_err, factors, ref, flavour):
    """A and G are the flavour's definitions; returns kron(A, G)'s error from the GGN."""
    a_ref, g_ref = FLAVOURS[flavour]
    a, g = factors
    assert rel_err(a, a_ref(ref)) < TOL
    assert rel_err(g, g_ref(ref)) < TOL
    return rel_err(np.kron(a, g), ref.ggn)


def run(model, net, loss_name, x, y, weight_sharing=None, fisher="exact"):
    """Checks the hand-written forward pass and the objective; returns (factors, refs)."""
    make_loss, loss_fn = LOSSES[loss_name]
    objective, z, refs = brute_force(net, loss_fn, x, y)
    np.testing.assert_allclose(z, model(x).numpy(), rtol=1e-4, atol=1e-5)
    opt, logs = kfac_step(model, make_loss(), x, y, fisher, weight_sharing=weight_sharing)
    assert float(logs["loss"]) == pytest.approx(objective, rel=1e-5)
    layers = [step.layer for step in net if isinstance(step, Linear)]
    return factors_of(opt, layers), refs


# --------------------------------------------- Dense: weight sharing over positions

BATCH, POSITIONS = 4, 3


def per_position_setting(rng, sizes=(3, 4, 2)):
    """expand's setting: linear Dense layers applied per position, mse over (B, T, k)."""
    model = keras.Sequential([keras.Input((POSITIONS, sizes[0])),
                              *[keras.layers.Dense(n) for n in sizes[1:]]])
    x = rng.normal(size=(BATCH, POSITIONS, sizes[0])).astype("float32")
    y = rng.normal(size=(BATCH, POSITIONS, sizes[-1])).astype("float32")
    return model, [dense_linear(layer) for layer in model.layers], x, y


def pooled_setting(rng, first=None):
    """reduce's setting: a linear layer on (B, T, d), GlobalAveragePooling1D, Dense, mse."""
    first = first or keras.layers.Dense(4)
    head = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((POSITIONS, 3)), first,
                              keras.layers.GlobalAveragePooling1D(), head])
    x = rng.normal(size=(BATCH, POSITIONS, 3)).astype("float32")
    y = rng.normal(size=(BATCH, 2)).astype("float32")
    wrap = einsum_linear if isinstance(first, keras.layers.EinsumDense) else dense_linear
    net = [wrap(first), functools.partial(tf.reduce_mean, axis=1), dense_linear(head)]
    return model, net, x, y


@pytest.mark.parametrize("form", ["default", "expand", "dict"])
def test_expand_is_exact_for_dense_layers_applied_per_position(form, rng, rel_err):
    """Linear Dense layers on (B, T, d), mse over positions, B = 4, fisher="exact".

    With expand (the default, the string, or a dict listing the first layer and leaving
    the second to the default) A and G are expand's definitions and kron(A, G) is the exact
    GGN block: each position is an independent example of the same linear map, with the
    same constant Mᵀ H M. Fails on a wrong sum/mean over positions or a wrong scale.
    """
    model, net, x, y = per_position_setting(rng)
    sharing = {"default": None, "expand": "expand",
               "dict": {model.layers[0].name: "expand"}}[form]
    factors, refs = run(model, net, "mse", x, y, sharing)
    for layer_factors, ref in zip(factors, refs, strict=True):
        assert check_factors(rel_err, layer_factors, ref, "expand") < TOL


@pytest.mark.parametrize("form", ["reduce", "dict"])
def test_reduce_is_exact_for_dense_layer_before_average_pooling(form, rng, rel_err):
    """Linear Dense on (B, T, d), GlobalAveragePooling1D, linear Dense, mse, B = 4.

    With reduce the pooled network is a Dense layer on the mean input āᵢ whose gradient is
    ĝᵢ = Σₜ g_{it}, so kron(A, G) of the first layer is the exact GGN block (the head, on
    rank-2 inputs, has no positions and is exact either way). Fails if reduce sums instead
    of averaging ā, averages instead of summing g, or is not applied at all.
    """
    model, net, x, y = pooled_setting(rng)
    sharing = "reduce" if form == "reduce" else {model.layers[0].name: "reduce"}
    factors, refs = run(model, net, "mse", x, y, sharing)
    for layer_factors, ref in zip(factors, refs, strict=True):
        assert check_factors(rel_err, layer_factors, ref, "reduce") < TOL


def test_expand_is_not_exact_before_average_pooling(rng, rel_err):
    """Negative control: the default expand in reduce's setting is not the GGN block.

    A and G are still expand's definitions, but there g_{it} = ĝᵢ/T, so kron(A, G) has
    (1/T²) Σₜ ā_{it}ā_{it}ᵀ where the GGN has āᵢāᵢᵀ = (1/T²)(Σₜ ā_{it})(Σₜ ā_{it})ᵀ: the
    pooling couples the positions, and the comparison above must reject expand here.
    Fails if the GGN comparison cannot tell the two flavours apart.
    """
    model, net, x, y = pooled_setting(rng)
    factors, refs = run(model, net, "mse", x, y)
    assert check_factors(rel_err, factors[0], refs[0], "expand") > WRONG
    assert check_factors(rel_err, factors[1], refs[1], "expand") < TOL  # no positions


def test_reduce_is_not_exact_for_dense_layers_applied_per_position(rng, rel_err):
    """Negative control: reduce in expand's setting is not the GGN block, for any layer.

    A and G are reduce's definitions, but the positions are independent examples there:
    the GGN has Σₜ ā_{it}ā_{it}ᵀ where reduce has T·āᵢāᵢᵀ, which differ by T times the
    covariance of ā over positions. Fails if "reduce" is ignored (expand would be exact
    here) or if the GGN comparison cannot tell the flavours apart.
    """
    model, net, x, y = per_position_setting(rng)
    factors, refs = run(model, net, "mse", x, y, "reduce")
    for layer_factors, ref in zip(factors, refs, strict=True):
        assert check_factors(rel_err, layer_factors, ref, "reduce") > WRONG


@pytest.mark.parametrize("reduced", [0, 1])
def test_weight_sharing_dict_chooses_the_flavour_per_layer(reduced, rng, rel_err):
    """weight_sharing={name: "reduce"} reduces only that layer; the unlisted one expands.

    Two Dense layers on (B, T, d): the listed layer's A and G must be reduce's
    definitions and the other's expand's (the two differ by far more than TOL here).
    Fails if the dict is ignored, applied to every layer, or keyed by something other
    than `layer.name`.
    """
    model, net, x, y = per_position_setting(rng)
    factors, refs = run(model, net, "mse", x, y, {model.layers[reduced].name: "reduce"})
    for index, (layer_factors, ref) in enumerate(zip(factors, refs, strict=True)):
        assert rel_err(a_reduce(ref), a_expand(ref)) > WRONG
        assert rel_err(g_reduce(ref), g_expand(ref)) > WRONG
        check_factors(rel_err, layer_factors, ref, "reduce" if index == reduced else "expand")


# ------------------------------------------------------------------- EinsumDense

EINSUM_STACKS = {
    # per-head query projection, then the attention output projection
    "attention": (4, [("abc,cde->abde", (None, 2, 3), "de"), ("abcd,cde->abe", (None, 3), "e")]),
    # kernel (d_out, d_in); kernel order (c, e, d) against output order (d, e); no bias
    "transposed": (3, [("abc,dc->abd", (None, 4), "d"), ("abc,ced->abde", (None, 2, 3), "de"),
                       ("abcd,cde->abe", (None, 2), None)]),
}


def einsum_setting(stack, rng, batch, positions, activation, loss_name):
    """A stack of EinsumDense layers on (B, T, d), `activation` between them."""
    d_in, specs = EINSUM_STACKS[stack]
    layers = [keras.layers.EinsumDense(equation, output_shape=shape, bias_axes=bias,
                                       activation=activation if i < len(specs) - 1 else None)
              for i, (equation, shape, bias) in enumerate(specs)]
    model = keras.Sequential([keras.Input((positions, d_in)), *layers])
    x = rng.normal(size=(batch, positions, d_in)).astype("float32")
    k = model.output_shape[-1]
    if loss_name == "mse":
        y = rng.normal(size=(batch, positions, k)).astype("float32")
    else:
        y = rng.integers(0, k, (batch, positions))
    for layer in layers:  # non-zero biases, so that their position in W̄ matters
        if layer.bias is not None:
            layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return model, [einsum_linear(layer) for layer in layers], x, y


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("stack", list(EINSUM_STACKS))
def test_einsum_dense_single_example_kron_equals_exact_ggn(stack, loss_name, rng, rel_err):
    """EinsumDense stacks with tanh between, B = 1, T = 1, fisher="exact": exact GGN.

    For one example at one position J = āᵀ ⊗ M factorises exactly, so kron(A, G) is the
    GGN block over row-major vec(W̄) only if W̄ is the kernel transposed to (contracted,
    output-only) labels with the bias (transposed to the output-only labels' kernel
    order) last, and ā the input in the contracted labels' kernel order. "transposed"
    has a (d_out, d_in) kernel and a kernel order unlike the output order, which pins
    both transposes: any other layout of W̄ or ā fails the A or the GGN comparison.
    """
    model, net, x, y = einsum_setting(stack, rng, 1, 1, "tanh", loss_name)
    factors, refs = run(model, net, loss_name, x, y)
    for layer_factors, ref in zip(factors, refs, strict=True):
        assert check_factors(rel_err, layer_factors, ref, "expand") < TOL


@pytest.mark.parametrize("stack", list(EINSUM_STACKS))
def test_einsum_dense_deep_linear_expand_is_exact(stack, rng, rel_err):
    """Linear EinsumDense stacks on (B, T, d), mse over positions, B = 4, T = 3.

    The default (expand) factors are expand's definitions over the position labels (the
    input labels not in the kernel), and kron(A, G) is the exact GGN block as for Dense.
    Fails if a head or head_dim axis is taken as a position (or a position as a feature),
    or if G is summed instead of averaged over positions.
    """
    model, net, x, y = einsum_setting(stack, rng, BATCH, POSITIONS, None, "mse")
    factors, refs = run(model, net, "mse", x, y)
    for layer_factors, ref in zip(factors, refs, strict=True):
        assert check_factors(rel_err, layer_factors, ref, "expand") < TOL


@pytest.mark.parametrize("control", ["tanh", "reduce"])
@pytest.mark.parametrize("stack", list(EINSUM_STACKS))
def test_einsum_dense_negative_controls(stack, control, rng, rel_err):
    """Negative controls: the EinsumDense comparisons reject a setting that is not exact.

    "tanh": tanh between the layers at B = 4, T = 3: Mᵢₜ varies, so every layer but the
    last is only approximated (its A and G are still expand's definitions). "reduce": the
    reduce flavour in the per-position linear setting is wrong for every layer. Fails if
    the EinsumDense GGN comparisons above could not fail.
    """
    activation = "tanh" if control == "tanh" else None
    model, net, x, y = einsum_setting(stack, rng, BATCH, POSITIONS, activation, "mse")
    sharing = "reduce" if control == "reduce" else None
    factors, refs = run(model, net, "mse", x, y, sharing)
    flavour = "reduce" if control == "reduce" else "expand"
    checked = len(refs) if control == "reduce" else len(refs) - 1
    for layer_factors, ref in zip(factors[:checked], refs[:checked], strict=True):
        assert check_factors(rel_err, layer_factors, ref, flavour) > WRONG


@pytest.mark.parametrize("flavour", ["reduce", "expand"])
def test_einsum_dense_before_average_pooling(flavour, rng, rel_err):
    """EinsumDense("abc,dc->abd"), GlobalAveragePooling1D, Dense, mse, B = 4.

    weight_sharing={einsum: "reduce"} makes kron(A, G) the exact GGN block, as for
    Dense; the default expand there is the negative control. Fails if the dict does not
    reach EinsumDense layers, or reduce is not mean-of-ā / sum-of-g over the position labels.
    """
    first = keras.layers.EinsumDense("abc,dc->abd", output_shape=(None, 4), bias_axes="d")
    model, net, x, y = pooled_setting(rng, first)
    sharing = {first.name: "reduce"} if flavour == "reduce" else None
    factors, refs = run(model, net, "mse", x, y, sharing)
    error = check_factors(rel_err, factors[0], refs[0], flavour)
    assert error < TOL if flavour == "reduce" else error > WRONG
    assert check_factors(rel_err, factors[1], refs[1], flavour) < TOL


# ------------------------------------------------------- convolutions (KFC), N-d

def patches_loop(x, kernel_size, strides, padding, dilation) -> np.ndarray:
    """(B, *out, prod(kernel_size)·C) patches by an explicit loop, in kernel.reshape order.

    Any number of spatial axes, channels last; "same" as TensorFlow pads (the extra one at
    the end), "causal" (1-d) pads dilation·(k − 1) zeros at the start only.
    """
    batch, *spatial, channels = x.shape
    out, before = [], []
    for size, k, s, d in zip(spatial, kernel_size, strides, dilation, strict=True):
        span = (k - 1) * d + 1
        if padding == "valid":
            out.append((size - span) // s + 1)
            before.append(0)
        elif padding == "causal":
            out.append((size + (k - 1) * d - span) // s + 1)
            before.append((k - 1) * d)
        else:
            out.append(-(-size // s))
            before.append(max((out[-1] - 1) * s + span - size, 0) // 2)
    rows = np.zeros((batch, *out, math.prod(kernel_size) * channels))
    for i in range(batch):
        for position in itertools.product(*[range(n) for n in out]):
            patch = []
            for offset in itertools.product(*[range(k) for k in kernel_size]):
                index = [o * s + k * d - b for o, k, s, d, b
                         in zip(position, offset, strides, dilation, before, strict=True)]
                inside = all(0 <= j < n for j, n in zip(index, spatial, strict=True))
                patch.append(x[(i, *index)] if inside else np.zeros(channels))
            rows[(i, *position)] = np.concatenate(patch)
    return rows


def empirical_head(s, activation_of_s, head, y):
    """ĝ = ∂h/∂s through tanh, Flatten and a Dense head, mse; h in float64."""
    s = tf.Variable(s)
    with tf.GradientTape() as tape:
        flat = tf.reshape(activation_of_s(s), (s.shape[0], -1))
        z = flat @ head[:-1] + head[-1]
        h = tf.reduce_mean(keras.losses.mean_squared_error(tf.constant(y, tf.float64), z))
    return tape.gradient(h, s).numpy()


def kfc_loops(rows, g_hat, c):
    """Ω = (1/B) Σᵢ Σₜ āāᵀ and Γ = c·(1/B) Σᵢ (1/|T|) Σₜ ggᵀ, g = (B/c)·ĝ, by loops."""
    batch, positions = rows.shape[:2]
    omega = np.zeros((rows.shape[-1],) * 2)
    gamma = np.zeros((g_hat.shape[-1],) * 2)
    for i in range(batch):
        for t in range(positions):
            omega += np.outer(rows[i, t], rows[i, t]) / batch
            g_it = (batch / c) * g_hat[i, t]
            gamma += c * np.outer(g_it, g_it) / (batch * positions)
    return omega, gamma


def check_conv_against_loop(layer_class, x, config, rel_err, filters=3):
    """tanh conv → Flatten → Dense(2) → mse, fisher="empirical": Ω and Γ by loops.

    The pre-activations are recomputed from the looped patches and checked against the
    layer's own output first, so the loop's padding and patch order are checked too.
    """
    batch = x.shape[0]
    y = np.random.default_rng(5).normal(size=(batch, 2)).astype("float32")
    conv = layer_class(filters, activation="tanh", **config)
    head = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input(x.shape[1:]), conv, keras.layers.Flatten(), head])
    n = x.ndim - 2

    def as_tuple(value):
        return (value,) * n if isinstance(value, int) else tuple(value)

    patches = patches_loop(f64(x), as_tuple(config["kernel_size"]),
                           as_tuple(config.get("strides", 1)), config.get("padding", "valid"),
                           as_tuple(config.get("dilation_rate", 1)))
    out_shape = patches.shape[:-1]
    rows = patches.reshape(batch, -1, patches.shape[-1])
    rows = with_ones(rows) if conv.bias is not None else rows
    s = (rows @ wbar(conv)).reshape(*out_shape, filters)
    np.testing.assert_allclose(np.tanh(s), conv(x).numpy(), rtol=1e-4, atol=1e-5)
    g_hat = empirical_head(s, tf.tanh, wbar(head), y).reshape(batch, -1, filters)
    omega, gamma = kfc_loops(rows, g_hat, c=1.0 / y.shape[1])

    opt, _ = kfac_step(model, keras.losses.MeanSquaredError(), x, y, "empirical")
    a, g = factors_of(opt, [conv])[0]
    assert rel_err(a, omega) < TOL
    assert rel_err(g, gamma) < TOL


CONV1D_CONFIGS = {
    "stride2-same-bias": dict(kernel_size=3, strides=2, padding="same"),
    "stride2-same-nobias": dict(kernel_size=3, strides=2, padding="same", use_bias=False),
    "dilated-valid-bias": dict(kernel_size=2, dilation_rate=2, padding="valid"),
    "dilated-same-nobias": dict(kernel_size=3, dilation_rate=2, padding="same", use_bias=False),
    "causal-dilated-bias": dict(kernel_size=3, dilation_rate=2, padding="causal"),
    "causal-stride2-nobias": dict(kernel_size=2, strides=2, padding="causal", use_bias=False),
}


@pytest.mark.parametrize("config", list(CONV1D_CONFIGS.values()), ids=list(CONV1D_CONFIGS))
def test_conv1d_factors_equal_explicit_patch_loop(config, rng, rel_err):
    """Conv1D (channels_last) Ω and Γ equal explicit loops over examples and positions.

    Length 7 makes "same" padding asymmetric; "causal" pads only on the left. Fails on a
    wrong patch order, padding, stride or dilation, a missing 1, or Γ's scale.
    """
    x = rng.normal(size=(2, 7, 2)).astype("float32")
    check_conv_against_loop(keras.layers.Conv1D, x, config, rel_err)


CONV3D_CONFIGS = {
    "stride2-same-bias": dict(kernel_size=(2, 3, 2), strides=(2, 2, 1), padding="same"),
    "stride-valid-nobias": dict(kernel_size=2, strides=(1, 2, 1), padding="valid",
                                use_bias=False),
    "dilated-valid-bias": dict(kernel_size=2, dilation_rate=(2, 1, 2), padding="valid"),
    "dilated-same-nobias": dict(kernel_size=(2, 2, 1), dilation_rate=(1, 2, 1),
                                padding="same", use_bias=False),
}


@pytest.mark.parametrize("config", list(CONV3D_CONFIGS.values()), ids=list(CONV3D_CONFIGS))
def test_conv3d_factors_equal_explicit_patch_loop(config, rng, rel_err):
    """Conv3D (channels_last) Ω and Γ equal explicit loops over examples and positions.

    Odd sizes make "same" padding asymmetric; the kernel is not cubic, so the order of the
    three spatial axes in a patch matters. Fails on a wrong patch order, padding, stride
    or dilation, a missing 1, or Γ's scale.
    """
    x = rng.normal(size=(2, 3, 5, 4, 2)).astype("float32")
    check_conv_against_loop(keras.layers.Conv3D, x, config, rel_err)


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_conv_covering_its_input_equals_dense(kind, rng, rel_err):
    """A valid Conv1D/Conv3D whose kernel covers its whole input gives the Dense layer's A, G.

    Same weights (Dense kernel = conv kernel reshaped (prod(k)·C, filters), the order in
    which Flatten lays out the input), fisher="exact": one output position, so Ω = A and
    Γ = G for both the conv and the head. Fails if the conv's patch order is not Flatten's
    (spatial row-major, channels last) or its Γ is scaled differently from Dense's G.
    """
    shape = (4, 2) if kind == "conv1d" else (2, 3, 2, 2)
    layer_class = keras.layers.Conv1D if kind == "conv1d" else keras.layers.Conv3D
    x = rng.normal(size=(5, *shape)).astype("float32")
    y = rng.integers(0, 3, 5)
    conv_model = keras.Sequential([
        keras.Input(shape), layer_class(4, shape[:-1], activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    dense_model = keras.Sequential([
        keras.Input(shape), keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3, activation="softmax")])
    kernel, bias, head_kernel, head_bias = conv_model.get_weights()
    dense_model.set_weights([kernel.reshape(-1, 4), bias, head_kernel, head_bias])
    np.testing.assert_allclose(dense_model(x), conv_model(x), rtol=1e-5, atol=1e-6)

    loss = keras.losses.SparseCategoricalCrossentropy
    conv_opt, _ = kfac_step(conv_model, loss(), x, y, "exact")
    dense_opt, _ = kfac_step(dense_model, loss(), x, y, "exact")
    conv_layers = [conv_model.layers[0], conv_model.layers[2]]
    dense_layers = [dense_model.layers[1], dense_model.layers[2]]
    for (a, g), (a_d, g_d) in zip(factors_of(conv_opt, conv_layers),
                                  factors_of(dense_opt, dense_layers), strict=True):
        assert rel_err(a, a_d) < 1e-5
        assert rel_err(g, g_d) < 1e-5


@pytest.mark.parametrize("form", ["default", "expand"])
def test_1x1_conv2d_equals_dense_applied_per_position(form, rng, rel_err):
    """A 1×1 Conv2D has the factors of a Dense layer applied per position (expand).

    Same weights (kernel (1, 1, C, f) reshaped (C, f)), fisher="exact": Ω sums and Γ
    averages over the H·W positions exactly as expand does for the Dense layer on
    (B, H, W, C); the heads (on flattened inputs) agree too. Fails if Dense on rank-4
    inputs and Conv2D treat positions differently (e.g. Dense averaging A over them).
    """
    x = rng.normal(size=(4, 3, 2, 2)).astype("float32")
    y = rng.integers(0, 3, 4)
    conv_model = keras.Sequential([
        keras.Input((3, 2, 2)), keras.layers.Conv2D(3, 1, activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    dense_model = keras.Sequential([
        keras.Input((3, 2, 2)), keras.layers.Dense(3, activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    kernel, bias, head_kernel, head_bias = conv_model.get_weights()
    dense_model.set_weights([kernel.reshape(2, 3), bias, head_kernel, head_bias])
    np.testing.assert_allclose(dense_model(x), conv_model(x), rtol=1e-5, atol=1e-6)

    sharing = None if form == "default" else "expand"
    loss = keras.losses.SparseCategoricalCrossentropy
    conv_opt, _ = kfac_step(conv_model, loss(), x, y, "exact", weight_sharing=sharing)
    dense_opt, _ = kfac_step(dense_model, loss(), x, y, "exact", weight_sharing=sharing)
    layers = [conv_model.layers[0], conv_model.layers[2]]
    dense_layers = [dense_model.layers[0], dense_model.layers[2]]
    for (a, g), (a_d, g_d) in zip(factors_of(conv_opt, layers),
                                  factors_of(dense_opt, dense_layers), strict=True):
        assert rel_err(a, a_d) < 1e-5
        assert rel_err(g, g_d) < 1e-5


# --------------------------------------------------------------- DepthwiseConv2D

@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv2d_per_channel_factors_equal_loop(multiplier, use_bias, rng, rel_err):
    """DepthwiseConv2D (stride 2, "same", channels_last): one (A_c, G_c) per input channel.

    For channel c, ā = [the channel's kh·kw patch, in kernel[:, :, c, :].reshape(kh·kw, m)
    row order; 1] and g ranges over the outputs c·m … c·m + m − 1; A has shape
    (C, kh·kw [+1], kh·kw [+1]) and G (C, m, m), each channel by the same loops as
    Conv2D (fisher="empirical"). The loop's pre-activations are checked against the
    layer's output first, which pins Keras's output channel order c·m + j. Fails on a
    wrong channel grouping of the outputs, mixed channels in A, or a wrong shape or scale.
    """
    batch, channels, kernel_size, strides = 2, 3, (3, 2), (2, 2)
    x = rng.normal(size=(batch, 5, 6, channels)).astype("float32")
    y = rng.normal(size=(batch, 2)).astype("float32")
    conv = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, padding="same",
                                        depth_multiplier=multiplier, use_bias=use_bias,
                                        activation="tanh")
    head = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input(x.shape[1:]), conv, keras.layers.Flatten(), head])
    kernel = f64(conv.kernel)
    bias = f64(conv.bias) if use_bias else None

    rows, s = [], []
    for c in range(channels):
        patches = patches_loop(f64(x[..., c:c + 1]), kernel_size, strides, "same", (1, 1))
        out_shape = patches.shape[:-1]
        channel_rows = patches.reshape(batch, -1, patches.shape[-1])
        w = kernel[:, :, c, :].reshape(-1, multiplier)
        if use_bias:
            channel_rows = with_ones(channel_rows)
            w = np.concatenate([w, bias[None, c * multiplier:(c + 1) * multiplier]])
        rows.append(channel_rows)
        s.append((channel_rows @ w).reshape(*out_shape, multiplier))
    s = np.concatenate(s, axis=-1)  # output channel c·m + j
    np.testing.assert_allclose(np.tanh(s), conv(x).numpy(), rtol=1e-4, atol=1e-5)
    g_hat = empirical_head(s, tf.tanh, wbar(head), y).reshape(batch, -1, channels, multiplier)

    opt, _ = kfac_step(model, keras.losses.MeanSquaredError(), x, y, "empirical")
    a, g = factors_of(opt, [conv])[0]
    depth = kernel_size[0] * kernel_size[1] + int(use_bias)
    assert a.shape == (channels, depth, depth)
    assert g.shape == (channels, multiplier, multiplier)
    for c in range(channels):
        omega, gamma = kfc_loops(rows[c], g_hat[:, :, c], c=1.0 / y.shape[1])
        assert rel_err(a[c], omega) < TOL
        assert rel_err(g[c], gamma) < TOL
