"""Small linear-algebra helpers: π, damped inverses, finiteness checks.

All of them work in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

import tensorflow as tf

# Mean eigenvalues below this are treated as zero when computing π, so that a
# layer whose factor vanishes (a dead unit, an all-zero input) gets a finite π.
# It is far below any scale a loss gives G (a mean over 10⁶ outputs of a
# vanishing gradient stays above it), so the loss's scale never meets it.
_TRACE_FLOOR = 1e-30


def pi_adjustment(a_factor: tf.Tensor, g_factor: tf.Tensor) -> tf.Tensor:
    """π = √((tr A / dim A) / (tr G / dim G)) (Martens & Grosse 2015, §6.3)."""
    a_mean = tf.linalg.trace(a_factor) / tf.cast(tf.shape(a_factor)[0], a_factor.dtype)
    g_mean = tf.linalg.trace(g_factor) / tf.cast(tf.shape(g_factor)[0], g_factor.dtype)
    # Square roots first: the ratio of two floored means could overflow float32.
    return tf.sqrt(tf.maximum(a_mean, _TRACE_FLOOR)) / tf.sqrt(tf.maximum(g_mean, _TRACE_FLOOR))


def damped_inverse(factor: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
    """(F + damping·I)⁻¹ of a symmetric factor, symmetrised, in float32."""
    factor = tf.cast(factor, tf.float32)
    dim = tf.shape(factor)[0]
    damped = 0.5 * (factor + tf.transpose(factor)) + damping * tf.eye(dim, dtype=tf.float32)
    inverse = tf.linalg.inv(damped)
    return 0.5 * (inverse + tf.transpose(inverse))


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
    checks = [tf.math.is_finite(tf.reduce_sum(tf.cast(t, tf.float32))) for t in tensors]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))
