"""EKFAC: the Kronecker factors' eigenbasis with a measured diagonal scaling.

George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis" (NeurIPS 2018). K-FAC's
A ⊗ G = (U_A ⊗ U_G) diag(λ_A ⊗ λ_G) (U_A ⊗ U_G)ᵀ; EKFAC keeps the eigenbasis
and replaces λ_A ⊗ λ_G by S, the second moments of the per-example gradients
projected on it, which is the diagonal that brings the curvature closest (in
Frobenius norm) to the Fisher block among matrices diagonal in that basis.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from tf_kfac.blocks.base import add_state
from tf_kfac.blocks.kronecker import KroneckerBlock
from tf_kfac.linalg import symmetrised

CURVATURES = ("kfac", "ekfac")


class EigenbasisRescaling:
    """Turns a `KroneckerBlock` kind into its EKFAC variant.

    State, in creation order: the moving averages A, G (as K-FAC), S (d_in,
    d_out), the basis S was measured in and how many batches it averages
    (replica-local variables: A and G are averaged across replicas at a
    refresh, while each batch's S is averaged before its moving average, so
    that S, its basis and count are the same on every replica); then what a
    refresh computes: U_A, U_G, λ_A, λ_G, the basis' number (one more at every
    refresh) and the damping δ = γ² = λc + η.

    - Statistics: with the stored eigenbasis, S_batch = (g_scale/B) Σᵢ
      (U_Aᵀ ∇W̄ᵢ U_G)², ∇W̄ᵢ = Σₜ āᵢₜ gᵢₜᵀ the example's gradient from the
      recorded rows (all positions, whatever the `weight_sharing` flavour,
      which shapes only A and G). With one position per example S_batch =
      (ã²)ᵀ(g̃²) costs two projections; with T positions the B per-example
      (d_in, d_out) matrices are formed, B·T·d_in·d_out work and B·d_in·d_out
      memory.
    - Moving average: S restarts (mean of the batches so far, then the decay)
      when the basis changed since it was accumulated.
    - Refresh: `tf.linalg.eigh` of A and G in float32.
    - Preconditioning: V = U_A [(U_Aᵀ ∇W̄ U_G) / (S + δ)] U_Gᵀ, with S the
      current moving average when it was measured in the current basis, else
      (after a refresh, until the next statistics) λ_A ⊗ λ_G, K-FAC's own
      diagonal in that basis.
    """

    # S, its basis and its count: the same on every replica (S of each batch averaged
    # across replicas; the basis is the refreshed, mirrored one).
    synchronized_statistics = (2, 3, 4)

    def __init__(self, layer):
        super().__init__(layer)
        self.kind = f"{self.kind}+ekfac"

    def build(self, optimizer) -> None:
        # Batched factors (C, n, n) and (C, m, m), as the depthwise block's, give
        # C eigenbases each and S of shape (C, n, m).
        a_shape, g_shape = self.factor_shapes()
        state = functools.partial(add_state, optimizer, self.name)
        self.a_factor = state(self.a_suffix, a_shape, True)
        self.g_factor = state("kfac_G", g_shape, True)
        self.second_moments = state("ekfac_S", (*a_shape[:-1], g_shape[-1]), True)
        self.moments_basis = state("ekfac_S_basis", (), True)
        self.moments_count = state("ekfac_S_count", (), True)
        self.a_basis = state("ekfac_A_basis", a_shape)
        self.g_basis = state("ekfac_G_basis", g_shape)
        self.a_eigenvalues = state("ekfac_A_eigenvalues", a_shape[:-1])
        self.g_eigenvalues = state("ekfac_G_eigenvalues", g_shape[:-1])
        self.basis = state("ekfac_basis", ())
        self.damping = state("ekfac_damping", ())

    @property
    def statistics(self):
        return (self.a_factor, self.g_factor, self.second_moments, self.moments_basis,
                self.moments_count)

    @property
    def refreshed(self):
        return (self.a_basis, self.g_basis, self.a_eigenvalues, self.g_eigenvalues,
                self.basis, self.damping)

    def batch_statistics(self, calls, output_gradients, batch_size, g_scale, example_weights):
        """[A, G] as K-FAC, S_batch, the basis it was measured in, 1 (one batch)."""
        # Per-example gradients Σₜ mₜ āₜgₜᵀ over every (real) position, whatever the flavour.
        mask = self._mask(calls)
        rows = self._input_rows(calls, mask, shared=False)
        outs = [self._output_rows(grads, mask, shared=False) for grads in output_gradients]
        if self.weight_sharing == "expand":  # A and G come from these same rows
            factors = self._factors(rows, outs, mask, batch_size, g_scale, example_weights)
        else:
            factors = KroneckerBlock.batch_statistics(self, calls, output_gradients, batch_size,
                                                      g_scale, example_weights)
        # The rows carry √wᵢ in the gradients only (as G does), so S = (1/B) Σ wᵢ (·)².
        a_proj = tf.einsum("bti,ij->btj", rows, tf.convert_to_tensor(self.a_basis))
        g_basis = tf.convert_to_tensor(self.g_basis)
        moments = 0.0
        for out in outs:
            g_proj = tf.einsum("bto,op->btp", out, g_basis)
            moments += tf.cond(  # the number of positions is rarely known statically
                tf.equal(tf.shape(a_proj)[1], 1),
                lambda g_proj=g_proj: tf.matmul(tf.square(a_proj[:, 0]),
                                                tf.square(g_proj[:, 0]), transpose_a=True),
                lambda g_proj=g_proj: tf.reduce_sum(
                    tf.square(tf.einsum("bti,btp->bip", a_proj, g_proj)), axis=0))
        moments *= g_scale / tf.cast(batch_size, tf.float32)
        return [*factors, moments, tf.convert_to_tensor(self.basis), tf.ones([])]

    def moving_average(self, old, new, decay):
        factors = super().moving_average(old[:2], new[:2], decay)
        moments, basis, count = old[2:]
        same = tf.equal(basis, new[3])
        count = tf.where(same, count + 1.0, 1.0)
        weight = tf.minimum(1.0 - 1.0 / count, decay)  # 0 on a new basis: restart
        moments = tf.where(same, weight * moments, 0.0) + (1.0 - weight) * new[2]
        return [*factors, moments, new[3], count]

    def refresh(self, statistics, gamma):
        a_values, a_vectors = eigenbasis(statistics[0])
        g_values, g_vectors = eigenbasis(statistics[1])
        damping = tf.square(tf.cast(gamma, tf.float32))
        return [a_vectors, g_vectors, a_values, g_values,
                tf.convert_to_tensor(self.basis) + 1.0, damping]

    def preconditioner(self, refreshed, statistics):
        """[U_A, U_G, S + δ]: S when measured in the current basis, else λ_A ⊗ λ_G."""
        a_vectors, g_vectors, a_values, g_values, basis, damping = refreshed
        kfac = tf.maximum(a_values, 0.0)[..., :, None] * tf.maximum(g_values, 0.0)[..., None, :]
        scaling = tf.where(tf.equal(statistics[3], basis), statistics[2], kfac)
        return [a_vectors, g_vectors, scaling + damping]

    def precondition(self, gradients, refreshed, loss_scale):
        a_vectors, g_vectors, scaling = refreshed
        matrix = self.gradient_matrix(gradients)
        projected = tf.matmul(tf.matmul(a_vectors, matrix, transpose_a=True), g_vectors)
        direction = tf.matmul(tf.matmul(a_vectors, projected / scaling), g_vectors,
                              transpose_b=True)
        return self.split_matrix(direction)

    def describe(self) -> str:
        return f"{super().describe()}; eigenbasis, S {self.input_size}x{self.output_size}"


def eigenbasis(factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(eigenvalues, eigenvectors as columns) of a symmetric factor, or of each of
    a batch of them (..., n, n), in float32.

    `tf.linalg.eigh` raises on a non-finite input, so such a factor is replaced
    by I and the results by NaN, which the estimator's refresh rejects (the
    block keeps its previous basis). Each matrix is divided by its largest
    entry first, so that no intermediate overflows.
    """
    factor = symmetrised(tf.cast(factor, tf.float32))
    finite = tf.reduce_all(tf.math.is_finite(factor))
    scale = tf.where(finite, tf.reduce_max(tf.abs(factor), axis=[-2, -1], keepdims=True), 1.0)
    scale = tf.where(scale > 0.0, scale, 1.0)
    eye = tf.eye(tf.shape(factor)[-1], dtype=tf.float32)
    values, vectors = tf.linalg.eigh(tf.where(finite, factor / scale, eye))
    poison = tf.where(finite, 0.0, float("nan"))
    return values * scale[..., 0] + poison, vectors + poison


def supports(block_type: type) -> bool:
    """Whether a block kind has the generic EKFAC variant: a `KroneckerBlock`
    whose statistics are KroneckerBlock's own (rows → A, G). The depthwise
    block's batches of factors have their own variant (`eigenbasis_variant`)."""
    return (issubclass(block_type, KroneckerBlock)
            and block_type.batch_statistics is KroneckerBlock.batch_statistics)


@functools.cache
def variant(block_type: type) -> type:
    """The EKFAC variant of a supported `KroneckerBlock` kind (one class per kind)."""
    return type(f"EKFAC{block_type.__name__}", (EigenbasisRescaling, block_type),
                {"__doc__": f"{block_type.__name__} with EKFAC's eigenbasis rescaling."})


def block_for(block_type: type, layer, curvature: str):
    """The block of `layer` for `curvature`: the EKFAC variant when its kind has one
    (its own `eigenbasis_variant`, or the generic one of a Kronecker kind whose input
    and output positions pair up), else the K-FAC block."""
    block = block_type(layer)
    if curvature != "ekfac":
        return block
    own = block_type.eigenbasis_variant()
    if own is not None:
        return own(layer)
    if supports(block_type) and getattr(block, "positions_aligned", True):
        return variant(block_type)(layer)
    return block
