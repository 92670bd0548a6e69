"""Kronecker-factored curvature for `keras.layers.Dense`."""

from __future__ import annotations

import tensorflow as tf

from tf_kfac.blocks.kronecker import KroneckerBlock


class DenseBlock(KroneckerBlock):
    """K-FAC block of a Dense layer (Martens & Grosse 2015, §3).

    A Dense layer applied to inputs of rank above 2 (a sequence, per-token
    projections) acts on the last axis at every position: the positions share
    the weights, in the optimizer's `weight_sharing` flavour.
    """

    kind = "dense"

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.reshape(inputs, [tf.shape(inputs)[0], -1, self.input_size - int(self.has_bias)])
