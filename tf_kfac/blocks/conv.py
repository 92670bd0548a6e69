"""Kronecker-factored curvature for Conv1D, Conv2D and Conv3D (KFC)."""

from __future__ import annotations

import tensorflow as tf

from tf_kfac.blocks.kronecker import KroneckerBlock

# Up to this patch size (window · c_in) 1- and 2-d patches come from a one-hot
# convolution, above it from tf.image.extract_patches (the faster of the two on
# each side); 3-d patches always come from the one-hot convolution.
_CONV_PATCH_DEPTH = 128


class ConvBlock(KroneckerBlock):
    """KFC block of a convolution of any rank (Grosse & Martens 2016).

    ā ranges over the input patches that the kernel sees at each output
    position, in the order of `kernel.reshape(-1, filters)`, zero padding
    included; the output positions share the weights (`"expand"`: Ω = (1/B) Σᵢ
    Σₜ āāᵀ, Γ = (1/B) Σᵢ (1/|T|) Σₜ ggᵀ). A convolution whose kernel covers its
    whole input (one output position) gives exactly the factors of the
    equivalent Dense layer. channels_first inputs are moved to channels_last;
    Conv1D's causal padding is applied as Keras applies it, on the left. A Keras
    mask on the input is ignored, as Keras ignores it (it drops the mask).
    """

    kind = "conv"
    # Keras convolutions do not support masking: a mask reaching one is dropped
    # (with Keras's warning), the convolution runs over every position and the
    # layers after it see no mask, so every output position counts.
    masks_positions = False

    def __init__(self, layer):
        super().__init__(layer)
        self.rank = len(layer.kernel_size)
        self.kind = f"conv{self.rank}d"
        self.kernel_size = tuple(layer.kernel_size)
        self.strides = tuple(layer.strides)
        self.dilation_rate = tuple(layer.dilation_rate)
        self.padding = layer.padding
        self.channels_first = layer.data_format == "channels_first"

    @classmethod
    def obstacle(cls, layer, trainable_ids):
        if getattr(layer, "groups", 1) != 1:
            return (f"grouped convolution (groups={layer.groups}): its kernel is not one "
                    "A ⊗ G over all input channels")
        return super().obstacle(layer, trainable_ids)

    def _channels_last(self, tensor: tf.Tensor) -> tf.Tensor:
        if not self.channels_first:
            return tensor
        return tf.transpose(tensor, [0, *range(2, self.rank + 2), 1])

    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        inputs = self._channels_last(inputs)
        padding = self.padding.upper()
        if padding == "CAUSAL":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "VALID"
        kernel_size, strides, rates = self.kernel_size, self.strides, self.dilation_rate
        if self.rank == 1:  # a 1-d convolution is a 2-d one over a height of 1
            inputs = inputs[:, None]
            kernel_size, strides, rates = (1, *kernel_size), (1, *strides), (1, *rates)
        depth = self.input_size - int(self.has_bias)
        if depth <= _CONV_PATCH_DEPTH or self.rank == 3:
            # A convolution with a one-hot kernel gives the same patches, and on
            # few channels it is much faster than extract_patches (10x on CPU
            # for a 5x5 kernel over one channel).
            identity = tf.reshape(tf.eye(depth, dtype=inputs.dtype), [*kernel_size, -1, depth])
            patches = tf.nn.convolution(inputs, identity, strides=strides, padding=padding,
                                        dilations=rates)
        else:
            patches = tf.image.extract_patches(
                inputs, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                rates=[1, *rates, 1], padding=padding)
        return tf.reshape(patches, [tf.shape(patches)[0], -1, depth])

    def output_rows(self, preactivation_grads: tf.Tensor) -> tf.Tensor:
        return super().output_rows(self._channels_last(preactivation_grads))
