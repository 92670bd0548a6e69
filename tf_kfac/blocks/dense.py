"""Kronecker-factored curvature for `keras.layers.Dense`."""

from __future__ import annotations

import tensorflow as tf

from tf_kfac.blocks.base import KroneckerBlock


class DenseBlock(KroneckerBlock):
    """K-FAC block of a Dense layer (Martens & Grosse 2015, §3).

    A Dense layer applied to inputs of rank above 2 (a sequence, say) acts on
    the last axis at every position; the positions are treated like a
    convolution's, so A sums over them and G averages over them.
    """

    kind = "dense"

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.reshape(inputs, [-1, self.input_size - int(self.has_bias)])
