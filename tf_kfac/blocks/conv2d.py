"""Kronecker-factored curvature for `keras.layers.Conv2D` (KFC)."""

from __future__ import annotations

import tensorflow as tf

from tf_kfac.blocks.base import KroneckerBlock

# Up to this patch size (kh·kw·c_in) patches come from a one-hot convolution,
# above it from tf.image.extract_patches (the faster of the two on each side).
_CONV_PATCH_DEPTH = 128


class Conv2DBlock(KroneckerBlock):
    """KFC block of a Conv2D layer (Grosse & Martens 2016).

    ā ranges over the input patches that the kernel sees at each output
    position, in the order of `kernel.reshape(-1, filters)`; Ω = (1/B) Σᵢ Σₜ
    āāᵀ and Γ = (1/B) Σᵢ (1/|T|) Σₜ ggᵀ. A conv whose kernel covers its whole
    input (one output position) gives exactly the factors of the equivalent
    Dense layer. channels_first inputs are transposed to channels_last.
    """

    kind = "conv2d"

    def __init__(self, layer):
        super().__init__(layer)
        self.kernel_size = tuple(layer.kernel_size)
        self.strides = tuple(layer.strides)
        self.dilation_rate = tuple(layer.dilation_rate)
        self.padding = layer.padding.upper()
        self.channels_first = layer.data_format == "channels_first"

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        if self.channels_first:
            inputs = tf.transpose(inputs, [0, 2, 3, 1])
        depth = self.input_size - int(self.has_bias)
        if depth <= _CONV_PATCH_DEPTH:
            # A convolution with a one-hot kernel gives the same patches, and on
            # few channels it is much faster than extract_patches (10x on CPU
            # for a 5x5 kernel over one channel).
            identity = tf.reshape(tf.eye(depth, dtype=inputs.dtype), [*self.kernel_size, -1, depth])
            patches = tf.nn.conv2d(inputs, identity, strides=[1, *self.strides, 1],
                                   padding=self.padding, dilations=[1, *self.dilation_rate, 1])
        else:
            patches = tf.image.extract_patches(
                inputs,
                sizes=[1, *self.kernel_size, 1],
                strides=[1, *self.strides, 1],
                rates=[1, *self.dilation_rate, 1],
                padding=self.padding,
            )
        return tf.reshape(patches, [-1, depth])

    def output_rows(self, preactivation_grads: tf.Tensor) -> tf.Tensor:
        if self.channels_first:
            preactivation_grads = tf.transpose(preactivation_grads, [0, 2, 3, 1])
        return super().output_rows(preactivation_grads)
