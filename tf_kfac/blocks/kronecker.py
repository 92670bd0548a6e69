"""The Kronecker-factored block A ⊗ G that every linear layer kind shares."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_kfac import masks
from tf_kfac.blocks.base import CurvatureBlock, add_state
from tf_kfac.linalg import factored_tikhonov_inverses

WEIGHT_SHARING = ("expand", "reduce")


class FactorPair:
    """The state of a block with two factors A and G: their moving averages
    (replica-local) and their damped inverses, created in that order.

    A class using it says the factors' shapes (`factor_shapes`) and may name A's
    variables differently (`a_suffix`).
    """

    a_suffix = "kfac_A"

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def build(self, optimizer) -> None:
        a_shape, g_shape = self.factor_shapes()
        self.a_factor = add_state(optimizer, self.name, self.a_suffix, a_shape, True)
        self.g_factor = add_state(optimizer, self.name, "kfac_G", g_shape, True)
        self.a_inverse = add_state(optimizer, self.name, f"{self.a_suffix}_inverse", a_shape)
        self.g_inverse = add_state(optimizer, self.name, "kfac_G_inverse", g_shape)

    @property
    def statistics(self):
        return (self.a_factor, self.g_factor)

    @property
    def refreshed(self):
        return (self.a_inverse, self.g_inverse)

    def kronecker_factors(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The current (A, G)."""
        return tf.convert_to_tensor(self.a_factor), tf.convert_to_tensor(self.g_factor)


class KroneckerBlock(FactorPair, CurvatureBlock):
    """A layer s = ā·W̄ with curvature A ⊗ G (Martens & Grosse 2015).

    W̄ is the kernel as a (d_in, d_out) matrix (`kernel_matrix`), with the bias
    appended as its last row; ā is the layer input at one position (a patch for
    a convolution) with a 1 appended when there is a bias. With weight sharing
    over T positions per example (sequences, convolutions) the block follows
    Eschenhagen et al. (NeurIPS 2023):

    - `"expand"`: A = (1/B) Σᵢ Σₜ āᵢₜāᵢₜᵀ and G = (1/B) Σᵢ (1/T) Σₜ gᵢₜgᵢₜᵀ,
      exact for deep linear networks whose loss sums over the positions (and
      the KFC factors of convolutions);
    - `"reduce"`: A = (1/B) Σᵢ āᵢāᵢᵀ with āᵢ the mean over positions and G =
      (1/B) Σᵢ ĝᵢĝᵢᵀ with ĝᵢ the sum over positions, exact when the positions are
      pooled before the loss; its statistics cost T times less.

    Positions that a Keras mask marks as padding enter neither factor (T then
    counts an example's real positions).

    With the row-major vectorisation of W̄ the Fisher block is ≈ kron(A, G).
    Subclasses say how a layer input becomes rows (`input_rows`) and, if not by
    a reshape, how the kernel becomes W̄ (`kernel_matrix`, `kernel_from_matrix`).
    """

    weight_sharing = "expand"
    weight_sharing_flavours: tuple[str, ...] = WEIGHT_SHARING

    def __init__(self, layer: keras.layers.Layer):
        variables = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        super().__init__(layer.path, variables)
        self._layer = layer
        self.has_bias = layer.bias is not None
        self.kernel_shape = tuple(layer.kernel.shape)
        self.output_size = int(self.kernel_shape[-1])
        self.input_size = math.prod(self.kernel_shape) // self.output_size + int(self.has_bias)
        self.a_factor = self.g_factor = self.a_inverse = self.g_inverse = None

    @classmethod
    def obstacle(cls, layer: keras.layers.Layer, trainable_ids: set[int]) -> str | None:
        """Why `layer` cannot get this block (None: it can)."""
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled layer: its LoRA factors train first-order"
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer ({layer.quantization_mode})"
        kernel = getattr(layer, "_kernel", None)
        if kernel is None:
            kernel = getattr(layer, "kernel", None)
        if kernel is None or id(kernel) not in trainable_ids:
            return "kernel is not trainable"
        bias = getattr(layer, "bias", None)
        if bias is not None and id(bias) not in trainable_ids:
            return "kernel trainable but bias frozen"
        return None

    @property
    def layer(self) -> keras.layers.Layer:
        return self._layer

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and G."""
        return (self.input_size,) * 2, (self.output_size,) * 2

    @property
    def refresh_cost(self) -> float:
        """The work of one refresh of the damped inverses: d³ per factor."""
        return float(self.input_size) ** 3 + float(self.output_size) ** 3

    # --------------------------------------------------------------- rows
    @abc.abstractmethod
    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """The layer input as (examples, positions, d_in), without the 1."""

    def output_rows(self, preactivation_grads: tf.Tensor) -> tf.Tensor:
        """Pre-activation gradients as (examples, positions, d_out)."""
        grads = tf.cast(preactivation_grads, tf.float32)
        return tf.reshape(grads, [tf.shape(grads)[0], -1, self.output_size])

    # Whether the statistics follow the calls' Keras masks (ConvBlock: no).
    masks_positions = True

    def position_axes(self, input_rank: int) -> int:
        """How many leading axes of an input of this rank are examples and positions."""
        return input_rank - 1

    def _mask(self, calls) -> tf.Tensor | None:
        """(examples, positions) float32, 1 at a real position; None when all are.

        The positions are those of `input_rows`, concatenated over the calls; a
        call without a mask has only real positions.
        """
        if not self.masks_positions or all(call.mask is None for call in calls):
            return None
        parts = []
        for call in calls:
            inputs = tf.cast(call.inputs, tf.float32)
            if call.mask is None:
                full = tf.ones_like(inputs)
            else:
                masks.check_positions_only(call.mask, self.position_axes(inputs.shape.rank),
                                           self.name)
                full = masks.broadcast_to_input(call.mask, inputs, self.name)
            parts.append(self.input_rows(full)[..., 0])
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def _input_rows(self, calls, mask=None, shared: bool = True) -> tf.Tensor:
        """(examples, positions, d_in) with the 1, masked positions zero; with
        `"reduce"` (unless `shared=False`) the mean over the real positions."""
        rows = [self.input_rows(tf.cast(call.inputs, tf.float32)) for call in calls]
        rows = tf.concat(rows, axis=1) if len(rows) > 1 else rows[0]
        reduce = shared and self.weight_sharing == "reduce"
        if reduce:
            rows = masks.masked_mean(rows, mask)
        elif mask is not None:
            rows *= mask[..., None]
        if self.has_bias:
            ones = tf.ones_like(rows[..., :1])
            if mask is not None:  # a masked position (an empty example) has no 1 either
                ones = (tf.reduce_max(mask, axis=1)[:, None, None] if reduce
                        else mask[..., None])
            rows = tf.concat([rows, ones], axis=-1)
        return rows

    def _output_rows(self, grads, mask=None, shared: bool = True) -> tf.Tensor:
        """Gradients at s as (examples, positions, d_out); with `"reduce"` (unless
        `shared=False`) the sum over the real positions."""
        rows = [self.output_rows(g[-1]) for g in grads]  # the gradients at s
        rows = tf.concat(rows, axis=1) if len(rows) > 1 else rows[0]
        if shared and self.weight_sharing == "reduce":
            if mask is not None:
                rows *= mask[..., None]
            rows = tf.reduce_sum(rows, axis=1, keepdims=True)
        return rows

    # --------------------------------------------------------- statistics
    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """A = Σᵢ wᵢ Σₜ mᵢₜāāᵀ / Σᵢ wᵢ (or (1/B) Σ without weights), G = g_scale·(1/B)·Σ.

        With the example weights wᵢ of the objective (1/B) Σ wᵢ ℓᵢ (sample and
        class weights), A is their weighted mean, so an example of weight 0 does
        not shape it; G carries the weights' scale, (1/B) Σ wᵢ gᵢgᵢᵀ, through the
        estimator's gradients. A Keras mask m removes the padded positions: with
        `"expand"`, G = (1/B) Σᵢ (1/Tᵢ) Σₜ mᵢₜ gᵢₜgᵢₜᵀ with Tᵢ the real
        positions of example i; with `"reduce"`, the mean input and the summed
        gradient run over the real positions (docs/design.md §3).
        """
        mask = self._mask(calls)
        outs = [self._output_rows(grads, mask) for grads in output_gradients]
        return self._factors(self._input_rows(calls, mask), outs, mask, batch_size, g_scale,
                             example_weights)

    def _factors(self, rows, outs, mask, batch_size, g_scale, example_weights):
        """[A, G] from the input rows and each gradient set's output rows (as
        `_input_rows` and `_output_rows` give them for this block's flavour)."""
        batch = tf.cast(batch_size, tf.float32)
        if example_weights is None:
            total = batch
        else:
            weights = tf.cast(example_weights, tf.float32)
            rows *= tf.sqrt(weights)[:, None, None]
            total = tf.reduce_sum(weights)
        rows = tf.reshape(rows, [-1, self.input_size])
        a = tf.math.divide_no_nan(tf.matmul(rows, rows, transpose_a=True), total)
        g = 0.0
        for out in outs:
            if mask is None or self.weight_sharing == "reduce":
                positions = tf.cast(tf.shape(out)[1], tf.float32)
                out = tf.reshape(out, [-1, self.output_size])
                g += tf.matmul(out, out, transpose_a=True) * (g_scale / (batch * positions))
            else:
                weighted = out * masks.expand_g_weights(mask, tf.shape(out)[1])[..., None]
                g += tf.matmul(tf.reshape(weighted, [-1, self.output_size]),
                               tf.reshape(out, [-1, self.output_size]),
                               transpose_a=True) * (g_scale / batch)
        return [a, g]

    def refresh(self, statistics, gamma):
        return list(factored_tikhonov_inverses(statistics[0], statistics[1], gamma))

    # ------------------------------------------------------ precondition
    def kernel_matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        """The kernel (or its gradient) as (d_in, d_out), bias row excluded."""
        return tf.reshape(kernel, [-1, self.output_size])

    def kernel_from_matrix(self, matrix: tf.Tensor) -> tf.Tensor:
        """Inverse of `kernel_matrix`."""
        return tf.reshape(matrix, self.kernel_shape)

    def bias_row(self, bias: tf.Tensor) -> tf.Tensor:
        return tf.reshape(bias, [self.output_size])

    def bias_from_row(self, row: tf.Tensor) -> tf.Tensor:
        return tf.reshape(row, self.variables[1].shape)

    def gradient_matrix(self, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
        """∇W̄: the kernel gradient as (d_in, d_out), the bias gradient as last row."""
        matrix = self.kernel_matrix(tf.cast(gradients[0], tf.float32))
        if self.has_bias:
            bias = self.bias_row(tf.cast(gradients[1], tf.float32))
            matrix = tf.concat([matrix, bias[None, :]], axis=0)
        return matrix

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `gradient_matrix`: back to the variables' shapes and dtypes."""
        parts = [self.kernel_from_matrix(matrix[: self.input_size - int(self.has_bias)])]
        if self.has_bias:
            parts.append(self.bias_from_row(matrix[-1]))
        return [tf.cast(p, v.dtype) for p, v in zip(parts, self.variables, strict=True)]

    def precondition(self, gradients, refreshed, loss_scale):
        a_inverse, g_inverse = refreshed
        matrix = self.gradient_matrix(gradients)
        return self.split_matrix(tf.matmul(tf.matmul(a_inverse, matrix), g_inverse))

    def dense_curvature(self, a_factor, g_factor) -> tf.Tensor:
        """kron(A, G): the block as a dense matrix over row-major vec(W̄) (tests)."""
        a = tf.linalg.LinearOperatorFullMatrix(tf.convert_to_tensor(a_factor))
        g = tf.linalg.LinearOperatorFullMatrix(tf.convert_to_tensor(g_factor))
        return tf.linalg.LinearOperatorKronecker([a, g]).to_dense()

    def describe(self) -> str:
        sharing = "" if self.weight_sharing == "expand" else f" ({self.weight_sharing})"
        return (f"A {self.input_size}x{self.input_size}, "
                f"G {self.output_size}x{self.output_size}{sharing}")
