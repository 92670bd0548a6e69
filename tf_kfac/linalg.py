"""Small linear-algebra helpers: π, damped inverses, finiteness checks.

All of them work in float32 whatever the model's compute dtype, and on single
factors (d, d) or batches of factors (n, d, d) alike.
"""

from __future__ import annotations

import tensorflow as tf

from tf_kfac import sparse

# Mean eigenvalues below this are treated as zero when computing π, so that a
# layer whose factor vanishes (a dead unit, an all-zero input) gets a finite π.
# It is far below any scale a loss gives G (a mean over 10⁶ outputs of a
# vanishing gradient stays above it), so the loss's scale never meets it.
_TRACE_FLOOR = 1e-30


def _mean_eigenvalue(factor: tf.Tensor) -> tf.Tensor:
    return tf.linalg.trace(factor) / tf.cast(tf.shape(factor)[-1], factor.dtype)


def pi_adjustment(a_factor: tf.Tensor, g_factor: tf.Tensor) -> tf.Tensor:
    """π = √((tr A / dim A) / (tr G / dim G)) (Martens & Grosse 2015, §6.3)."""
    return pi_from_means(_mean_eigenvalue(a_factor), _mean_eigenvalue(g_factor))


def pi_from_means(a_mean: tf.Tensor, g_mean: tf.Tensor) -> tf.Tensor:
    """π from the factors' mean eigenvalues (for a diagonal A, its mean entry)."""
    # Square roots first: the ratio of two floored means could overflow float32.
    return tf.sqrt(tf.maximum(a_mean, _TRACE_FLOOR)) / tf.sqrt(tf.maximum(g_mean, _TRACE_FLOOR))


def symmetrised(matrix: tf.Tensor) -> tf.Tensor:
    if matrix.shape[-1] == 1:
        # 1×1 matrices are symmetric. (Under TF 2.21's graph optimisations the
        # transpose of a batch of 1×1 matrices in a refresh made the step's
        # function return empty outputs.)
        return matrix
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


def damped_inverse(factor: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
    """(F + damping·I)⁻¹ of a symmetric factor (or of each in a batch), in float32."""
    factor = tf.cast(factor, tf.float32)
    # One damping per factor of a batch.
    damping = tf.convert_to_tensor(damping, tf.float32)[..., tf.newaxis, tf.newaxis]
    eye = tf.eye(factor.shape[-1] or tf.shape(factor)[-1], dtype=tf.float32)
    return symmetrised(tf.linalg.inv(symmetrised(factor) + damping * eye))


def factored_tikhonov_inverses(
    a_factor: tf.Tensor, g_factor: tf.Tensor, gamma: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(A + πγI)⁻¹ and (G + (γ/π)I)⁻¹ (Martens & Grosse 2015, §6.3)."""
    pi = pi_adjustment(a_factor, g_factor)
    return damped_inverse(a_factor, pi * gamma), damped_inverse(g_factor, gamma / pi)


def all_finite(tensors) -> tf.Tensor:
    """A scalar bool: every entry of every tensor is finite.

    Sums first (a sum holding inf or NaN is not finite), which is cheaper than
    an elementwise check; a sum that overflows from finite values also counts as
    not finite, which errs on the safe side.
    """
    checks = [tf.math.is_finite(tf.reduce_sum(tf.cast(sparse.values(t), tf.float32)))
              for t in tensors]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))
