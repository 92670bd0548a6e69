"""Kronecker-factored curvature for `keras.layers.Embedding`, with a diagonal A."""

from __future__ import annotations

import functools

import tensorflow as tf

from tf_kfac import masks, sparse
from tf_kfac.blocks.base import CurvatureBlock, add_state
from tf_kfac.blocks.ekfac import EigenbasisRescaling, eigenbasis
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

    @classmethod
    def eigenbasis_variant(cls) -> type:
        return EKFACEmbeddingBlock

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



class EKFACEmbeddingBlock(EigenbasisRescaling, EmbeddingBlock):
    """EKFAC for an Embedding: A is diagonal, so its eigenbasis is the identity and
    Q = I ⊗ U_G. S (vocab × d) holds, per token v, S_v = c·(1/B) Σᵢ (U_Gᵀ ∇Eᵢ[v])²,
    ∇Eᵢ[v] = Σₜ mᵢₜ [xᵢₜ = v] gᵢₜ the example's gradient of row v (summed over the
    positions that look v up, padding excluded): the rows of the (example, token)
    pairs the batch holds, never a B × vocab × d tensor. Until S is measured in a
    new basis the scaling is K-FAC's own, A_v·λ_G. A row-sparse gradient is
    preconditioned on its rows only, as in K-FAC.
    """

    def build(self, optimizer) -> None:
        state = functools.partial(add_state, optimizer, self.name)
        vocab, d = self.vocabulary, self.output_size
        self.a_factor = state(self.a_suffix, (vocab,), True)
        self.g_factor = state("kfac_G", (d, d), True)
        self.second_moments = state("ekfac_S", (vocab, d), True)
        self.moments_basis = state("ekfac_S_basis", (), True)
        self.moments_count = state("ekfac_S_count", (), True)
        self.a_eigenvalues = state("ekfac_A_eigenvalues", (vocab,))
        self.g_basis = state("ekfac_G_basis", (d, d))
        self.g_eigenvalues = state("ekfac_G_eigenvalues", (d,))
        self.basis = state("ekfac_basis", ())
        self.damping = state("ekfac_damping", ())

    @property
    def refreshed(self):
        return (self.a_eigenvalues, self.g_basis, self.g_eigenvalues, self.basis, self.damping)

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """[A, G] as K-FAC, S_batch, the basis it was measured in, 1 (one batch)."""
        ids, mask, rows = self._rows(calls, output_gradients)
        factors = self._counts_and_g(ids, mask, rows, batch_size, g_scale, example_weights)
        # One key per (example, token) pair: its rows summed are the example's row gradient.
        keys = (tf.range(tf.shape(ids, out_type=tf.int64)[0])[:, None] * self.vocabulary
                + tf.cast(ids, tf.int64))
        pairs, pair_of = tf.unique(tf.reshape(keys, [-1]))
        token = pairs % self.vocabulary
        g_basis = tf.convert_to_tensor(self.g_basis)
        moments = tf.zeros([self.vocabulary, self.output_size])
        for set_rows in rows:  # the gradients carry √wᵢ, so S = (1/B) Σ wᵢ (·)²
            if mask is not None:
                set_rows *= mask[..., None]
            projected = tf.matmul(tf.reshape(set_rows, [-1, self.output_size]), g_basis)
            per_pair = tf.math.unsorted_segment_sum(projected, pair_of, tf.size(pairs))
            moments += tf.math.unsorted_segment_sum(tf.square(per_pair), token, self.vocabulary)
        moments *= g_scale / tf.cast(batch_size, tf.float32)
        return [*factors, moments, tf.convert_to_tensor(self.basis), tf.ones([])]

    def refresh(self, statistics, gamma):
        g_values, g_vectors = eigenbasis(statistics[1])
        return [tf.convert_to_tensor(statistics[0]), g_vectors, g_values,
                tf.convert_to_tensor(self.basis) + 1.0, tf.square(tf.cast(gamma, tf.float32))]

    def preconditioner(self, refreshed, statistics):
        """[A, U_G, λ_G, S, whether S was measured in the current basis, δ]."""
        a_values, g_vectors, g_values, basis, damping = refreshed
        return [a_values, g_vectors, g_values, statistics[2],
                tf.equal(statistics[3], basis), damping]

    def precondition(self, gradients, refreshed, loss_scale):
        """[(∇ U_G) ⊘ (S + δ)] U_Gᵀ, on the rows of a row-sparse gradient only."""
        a_values, g_vectors, g_values, moments, measured, damping = refreshed
        gradient, dtype = gradients[0], self.variables[0].dtype
        if sparse.is_sparse(gradient):
            rows, a_rows = gradient.values, tf.gather(a_values, gradient.indices)
            moments = tf.gather(moments, gradient.indices)
        else:
            rows, a_rows = gradient, a_values
        kfac = tf.maximum(a_rows, 0.0)[:, None] * tf.maximum(g_values, 0.0)[None, :]
        scaling = tf.where(measured, moments, kfac) + damping
        projected = tf.matmul(tf.cast(rows, tf.float32), g_vectors) / scaling
        direction = tf.cast(tf.matmul(projected, g_vectors, transpose_b=True), dtype)
        if sparse.is_sparse(gradient):
            return [sparse.with_values(gradient, direction)]
        return [direction]

    def describe(self) -> str:
        return (f"A diagonal {self.vocabulary}, G {self.output_size}x{self.output_size}; "
                f"eigenbasis of G, S {self.vocabulary}x{self.output_size}")

def _concat(parts: list[tf.Tensor]) -> tf.Tensor:
    return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
