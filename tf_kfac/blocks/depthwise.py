"""Per-channel Kronecker factors for DepthwiseConv1D and DepthwiseConv2D."""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf

from tf_kfac.blocks.ekfac import EigenbasisRescaling
from tf_kfac.blocks.kronecker import KroneckerBlock


class DepthwiseConvBlock(KroneckerBlock):
    """One KFC block per input channel of a depthwise convolution.

    Channel c's weights W̄_c = [kernel[..., c, :] as (window, m); bias of its m
    outputs] act only on channel c's patches, so its Fisher block is ≈ A_c ⊗
    G_c with A_c = (1/B) Σᵢ Σₜ āāᵀ over that channel's patches (with a 1 for
    the bias) and G_c = (1/B) Σᵢ (1/|T|) Σₜ ggᵀ over its m = depth_multiplier
    outputs (the expand flavour). The factors are stored as batches, (C, window+1, window+1) and
    (C, m, m), and inverted together; the cross-channel blocks are zero.
    """

    kind = "depthwise_conv"
    weight_sharing_flavours = ("expand",)

    def __init__(self, layer):
        super().__init__(layer)
        *window, self.channels, self.multiplier = self.kernel_shape
        self.window = tuple(window)
        self.window_size = math.prod(window)
        self.input_size = self.window_size + int(self.has_bias)
        self.output_size = self.multiplier
        self.strides = tuple(layer.strides)
        self.dilation_rate = tuple(layer.dilation_rate)
        self.padding = layer.padding
        self.channels_first = layer.data_format == "channels_first"

    @classmethod
    def eigenbasis_variant(cls) -> type | None:
        """EKFAC per channel (`PerChannelRescaling`), for the kinds that keep this
        block's statistics."""
        if cls.batch_statistics is not DepthwiseConvBlock.batch_statistics:
            return None
        return _per_channel_variant(cls)

    def factor_shapes(self):
        return ((self.channels, self.input_size, self.input_size),
                (self.channels, self.multiplier, self.multiplier))

    @property
    def refresh_cost(self) -> float:
        return self.channels * (float(self.input_size) ** 3 + float(self.multiplier) ** 3)

    def _channels_last(self, tensor):
        if not self.channels_first:
            return tensor
        return tf.transpose(tensor, [0, *range(2, tensor.shape.rank), 1])

    def input_rows(self, inputs):
        """Patches as (examples, positions, C, window), by a one-hot depthwise conv."""
        inputs = self._channels_last(inputs)
        one_hot = tf.reshape(tf.eye(self.window_size, dtype=inputs.dtype),
                             [*self.window, 1, self.window_size])
        one_hot = tf.tile(one_hot, [1] * len(self.window) + [self.channels, 1])
        patches = keras.ops.depthwise_conv(
            inputs, one_hot, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format="channels_last")
        return tf.reshape(patches, [tf.shape(patches)[0], -1, self.channels, self.window_size])

    def output_rows(self, preactivation_grads):
        grads = self._channels_last(tf.cast(preactivation_grads, tf.float32))
        return tf.reshape(grads, [tf.shape(grads)[0], -1, self.channels, self.multiplier])

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        rows, outs = self._rows(calls, output_gradients)
        return self._factors(rows, outs, batch_size, g_scale, example_weights)

    def _rows(self, calls, output_gradients):
        """(the patches (examples, positions, C, window [+1]), with the bias' 1, and for
        each gradient set the gradients at s as (examples, positions, C, m)), the
        positions of all calls side by side."""
        rows = [self.input_rows(tf.cast(call.inputs, tf.float32)) for call in calls]
        rows = tf.concat(rows, axis=1) if len(rows) > 1 else rows[0]
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
        outs = []
        for grads in output_gradients:
            out = [self.output_rows(gr[-1]) for gr in grads]  # the gradients at s
            outs.append(tf.concat(out, axis=1) if len(out) > 1 else out[0])
        return rows, outs

    def _factors(self, rows, outs, batch_size, g_scale, example_weights):
        """[A, G] per channel from `_rows`' patches and gradients."""
        batch = tf.cast(batch_size, tf.float32)
        total = batch
        if example_weights is not None:
            weights = tf.cast(example_weights, tf.float32)
            rows *= tf.sqrt(weights)[:, None, None, None]
            total = tf.reduce_sum(weights)
        a = tf.math.divide_no_nan(tf.einsum("btci,btcj->cij", rows, rows), total)
        g = 0.0
        for out in outs:
            positions = tf.cast(tf.shape(out)[1], tf.float32)
            g += tf.einsum("btci,btcj->cij", out, out) * (g_scale / (batch * positions))
        return [a, g]

    def gradient_matrix(self, gradients):
        """(C, window [+1], m): each channel's ∇W̄_c."""
        kernel = tf.reshape(tf.cast(gradients[0], tf.float32),
                            [self.window_size, self.channels, self.multiplier])
        matrix = tf.transpose(kernel, [1, 0, 2])
        if self.has_bias:
            bias = tf.reshape(tf.cast(gradients[1], tf.float32), [self.channels, 1, -1])
            matrix = tf.concat([matrix, bias], axis=1)
        return matrix

    def split_matrix(self, matrix):
        kernel = tf.transpose(matrix[:, : self.window_size], [1, 0, 2])
        parts = [tf.reshape(kernel, self.kernel_shape)]
        if self.has_bias:
            parts.append(tf.reshape(matrix[:, -1], [-1]))
        return [tf.cast(p, v.dtype) for p, v in zip(parts, self.variables, strict=True)]

    def dense_curvature(self, a_factor, g_factor):
        """The block-diagonal matrix of the channels' kron(A_c, G_c) (tests).

        Its rows follow the channels, each over row-major vec(W̄_c).
        """
        blocks = [tf.linalg.LinearOperatorKronecker([
            tf.linalg.LinearOperatorFullMatrix(a), tf.linalg.LinearOperatorFullMatrix(g)])
            for a, g in zip(tf.unstack(a_factor), tf.unstack(g_factor), strict=True)]
        return tf.linalg.LinearOperatorBlockDiag(blocks).to_dense()

    def describe(self) -> str:
        return (f"{self.channels} x (A {self.input_size}x{self.input_size}, "
                f"G {self.multiplier}x{self.multiplier})")


class PerChannelRescaling(EigenbasisRescaling):
    """EKFAC for a depthwise convolution: each channel c its own eigenbases U_A[c],
    U_G[c] of A_c and G_c, and S_c = (g_scale/B) Σᵢ (U_A[c]ᵀ ∇W̄ᵢ,c U_G[c])², with
    ∇W̄ᵢ,c = Σₜ āᵢₜ,c gᵢₜ,cᵀ the example's gradient of the channel's kernel slice
    (and bias), from the recorded patches and output gradients (no extra pass).
    Until S is measured in a new basis the scaling is K-FAC's λ_A[c] ⊗ λ_G[c].

    The state is `EigenbasisRescaling`'s with a leading channel axis: bases
    (C, n, n) and (C, m, m), eigenvalues (C, n) and (C, m), S (C, n, m), n the
    window (+1 for the bias) and m the depth multiplier. Forming the per-example
    gradients costs B·T·C·n·m multiply-adds and B·C·n·m floats.
    """

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """[A, G] as K-FAC, S_batch, the basis it was measured in, 1 (one batch)."""
        rows, outs = self._rows(calls, output_gradients)
        factors = self._factors(rows, outs, batch_size, g_scale, example_weights)
        # The gradients carry √wᵢ (as for G), the patches no weight: S = (1/B) Σ wᵢ (·)².
        a_proj = tf.einsum("btci,cij->btcj", rows, tf.convert_to_tensor(self.a_basis))
        g_basis = tf.convert_to_tensor(self.g_basis)
        moments = 0.0
        for out in outs:
            g_proj = tf.einsum("btco,cop->btcp", out, g_basis)
            per_example = tf.einsum("btci,btcp->bcip", a_proj, g_proj)
            moments += tf.reduce_sum(tf.square(per_example), axis=0)
        moments *= g_scale / tf.cast(batch_size, tf.float32)
        return [*factors, moments, tf.convert_to_tensor(self.basis), tf.ones([])]

    def describe(self) -> str:
        return (f"{super(EigenbasisRescaling, self).describe()}; eigenbases per channel, "
                f"S {self.channels}x{self.input_size}x{self.multiplier}")


@functools.cache
def _per_channel_variant(block_type: type) -> type:
    """The EKFAC variant of a depthwise kind (one class per kind)."""
    return type(f"EKFAC{block_type.__name__}", (PerChannelRescaling, block_type),
                {"__doc__": f"{block_type.__name__} with EKFAC's rescaling per channel."})
