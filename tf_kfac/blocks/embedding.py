"""Kronecker-factored curvature for `keras.layers.Embedding`, with a diagonal A."""

from __future__ import annotations

import tensorflow as tf

from tf_kfac import masks, sparse
from tf_kfac.blocks.base import CurvatureBlock
from tf_kfac.blocks.kronecker import FactorPair
from tf_kfac.linalg import damped_inverse, pi_from_means


class EmbeddingBlock(FactorPair, CurvatureBlock):
    """K-FAC block of an Embedding layer: a lookup is a Dense layer on one-hot inputs.

    The one-hot rows make A diagonal, the token counts A_vv = Σᵢ wᵢ Σₜ [xᵢₜ = v] / Σᵢ wᵢ
    (a vector of the vocabulary size, never a vocab × vocab matrix); G is dense over
    the embedding dimension, G = (1/B) Σᵢ (1/T) Σₜ ggᵀ over the positions (the expand
    flavour). The damped inverse of the diagonal A is elementwise. Padded positions
    (a Keras mask on the ids, or id 0 with `mask_zero=True`) are not counted and add
    nothing to G, whose T is then each example's number of real positions.
    """

    kind = "embedding"
    sparse_gradients = True
    a_suffix = "kfac_A_diagonal"

    def __init__(self, layer):
        super().__init__(layer.path, [layer.embeddings])
        self._layer = layer
        self.vocabulary, self.output_size = (int(d) for d in layer.embeddings.shape)
        self.a_factor = self.g_factor = self.a_inverse = self.g_inverse = None

    @classmethod
    def obstacle(cls, layer, trainable_ids):
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled layer: its LoRA factors train first-order"
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer ({layer.quantization_mode})"
        if id(layer.embeddings) not in trainable_ids:
            return "embeddings are not trainable"
        return None

    @property
    def layer(self):
        return self._layer

    def factor_shapes(self):
        """A as the vector of its diagonal, G dense."""
        return (self.vocabulary,), (self.output_size,) * 2

    @property
    def refresh_cost(self) -> float:
        return float(self.vocabulary) + float(self.output_size) ** 3

    def _mask(self, call) -> tf.Tensor | None:
        """(examples, positions) float32 of the call's real positions, or None."""
        if call.mask is None:
            return None
        ids = call.inputs
        full = masks.broadcast_to_input(call.mask, tf.zeros_like(ids, tf.float32), self.name)
        return tf.reshape(full, [tf.shape(ids)[0], -1])

    def _rows(self, calls, output_gradients):
        """(ids (B, T), mask (B, T) or None, output-gradient rows (B, T, d) per set), the
        positions of all calls side by side."""
        call_masks = [self._mask(call) for call in calls]
        ids = [tf.reshape(tf.cast(call.inputs, tf.int32), [tf.shape(call.inputs)[0], -1])
               for call in calls]
        mask = None
        if any(m is not None for m in call_masks):
            mask = _concat([tf.ones(tf.shape(i), tf.float32) if m is None else m
                            for i, m in zip(ids, call_masks, strict=True)])
        rows = [_concat([tf.reshape(tf.cast(gr[-1], tf.float32),
                                    [tf.shape(gr[-1])[0], -1, self.output_size])
                         for gr in grads]) for grads in output_gradients]
        return _concat(ids), mask, rows

    def _counts_and_g(self, ids, mask, rows, batch_size, g_scale, example_weights):
        """A's diagonal (the weighted counts) and G, over the real positions only."""
        batch = tf.cast(batch_size, tf.float32)
        weights = tf.ones_like(ids, tf.float32) if mask is None else mask
        if example_weights is not None:
            weights *= tf.cast(example_weights, tf.float32)[:, None]
        counts = tf.math.unsorted_segment_sum(
            tf.reshape(weights, [-1]), tf.reshape(ids, [-1]), self.vocabulary)
        total = batch if example_weights is None else tf.reduce_sum(example_weights)
        a = tf.math.divide_no_nan(counts, tf.cast(total, tf.float32))
        g = 0.0
        for set_rows in rows:
            position_weights = masks.expand_g_weights(mask, tf.shape(set_rows)[1])
            if mask is not None:
                position_weights = tf.reshape(position_weights, [-1, 1])
            flat = tf.reshape(set_rows, [-1, self.output_size])
            g += tf.matmul(flat * position_weights, flat, transpose_a=True) * (g_scale / batch)
        return a, g

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """Counts and G over the real positions only (a Keras mask, `mask_zero`)."""
        ids, mask, rows = self._rows(calls, output_gradients)
        return list(self._counts_and_g(ids, mask, rows, batch_size, g_scale, example_weights))

    def refresh(self, statistics, gamma):
        a, g = statistics
        pi = pi_from_means(tf.reduce_mean(a), tf.linalg.trace(g) / self.output_size)
        return [1.0 / (a + pi * gamma), damped_inverse(g, gamma / pi)]

    def precondition(self, gradients, refreshed, loss_scale):
        """diag(A)⁻¹ ∇ G⁻¹; for a row-sparse gradient on its rows only (no vocab × d × d)."""
        a_inverse, g_inverse = refreshed
        gradient, dtype = gradients[0], self.variables[0].dtype
        if sparse.is_sparse(gradient):
            rows = tf.matmul(tf.cast(gradient.values, tf.float32), g_inverse)
            rows *= tf.gather(a_inverse, gradient.indices)[:, None]
            return [sparse.with_values(gradient, tf.cast(rows, dtype))]
        direction = a_inverse[:, None] * tf.matmul(tf.cast(gradient, tf.float32), g_inverse)
        return [tf.cast(direction, dtype)]

    def dense_curvature(self, a_factor, g_factor):
        """kron(diag(A), G) over row-major vec(embeddings) (tests)."""
        return tf.linalg.LinearOperatorKronecker([
            tf.linalg.LinearOperatorDiag(tf.convert_to_tensor(a_factor)),
            tf.linalg.LinearOperatorFullMatrix(tf.convert_to_tensor(g_factor))]).to_dense()

    def describe(self) -> str:
        return f"A diagonal {self.vocabulary}, G {self.output_size}x{self.output_size}"


def _concat(parts: list[tf.Tensor]) -> tf.Tensor:
    return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
