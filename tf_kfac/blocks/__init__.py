"""Curvature blocks: one small class per layer kind behind one interface.

A layer kind is one `CurvatureBlock` subclass (usually a `KroneckerBlock`
that says how the layer's input becomes rows), registered for its layer class
with `register_block`; `blocks_for_model` does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from tf_kfac.blocks.base import CurvatureBlock, FirstOrderBlock, PartsBlock
from tf_kfac.blocks.conv import ConvBlock
from tf_kfac.blocks.dense import DenseBlock
from tf_kfac.blocks.depthwise import DepthwiseConvBlock
from tf_kfac.blocks.einsum_dense import EinsumDenseBlock
from tf_kfac.blocks.ekfac import CURVATURES, EigenbasisRescaling, block_for
from tf_kfac.blocks.embedding import EmbeddingBlock
from tf_kfac.blocks.kronecker import WEIGHT_SHARING, KroneckerBlock
from tf_kfac.blocks.normalization import ScaleShiftBlock
from tf_kfac.blocks.recurrent import RecurrentBlock
from tf_kfac.blocks.separable import SeparableConvBlock

# Checked in order: the first layer class that matches gives the block.
_BLOCK_TYPES: list[tuple[type, type[CurvatureBlock]]] = [
    (keras.layers.Conv1D, ConvBlock),
    (keras.layers.Conv2D, ConvBlock),
    (keras.layers.Conv3D, ConvBlock),
    (keras.layers.DepthwiseConv1D, DepthwiseConvBlock),
    (keras.layers.DepthwiseConv2D, DepthwiseConvBlock),
    (keras.layers.SeparableConv1D, SeparableConvBlock),
    (keras.layers.SeparableConv2D, SeparableConvBlock),
    (keras.layers.EinsumDense, EinsumDenseBlock),
    (keras.layers.Dense, DenseBlock),
    (keras.layers.Embedding, EmbeddingBlock),
    (keras.layers.LayerNormalization, ScaleShiftBlock),
    (keras.layers.BatchNormalization, ScaleShiftBlock),
    (keras.layers.SimpleRNN, RecurrentBlock),
    (keras.layers.LSTM, RecurrentBlock),
    (keras.layers.GRU, RecurrentBlock),
]

__all__ = [
    "CURVATURES",
    "WEIGHT_SHARING",
    "ConvBlock",
    "CurvatureBlock",
    "DenseBlock",
    "DepthwiseConvBlock",
    "EigenbasisRescaling",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "FirstOrderBlock",
    "KroneckerBlock",
    "PartsBlock",
    "RecurrentBlock",
    "ScaleShiftBlock",
    "SeparableConvBlock",
    "block_type_for",
    "blocks_for_model",
    "register_block",
]


def register_block(layer_class: type, block_class: type[CurvatureBlock]) -> None:
    """Gives every layer of `layer_class` (and its subclasses) a `block_class` block.

    `block_class(layer)` must build a `CurvatureBlock` (a `KroneckerBlock`
    subclass needs only `input_rows`). A later registration of the same or a
    parent class takes precedence over the built-in kinds. The layer's `call`
    is recorded inside K-FAC's step: its input, and the output before the
    layer's `activation` (when it has one).

    Raises:
        TypeError: when the classes are not a Keras layer and a block class.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"`layer_class` must be a keras.layers.Layer subclass; "
                        f"received {layer_class!r}.")
    if not (isinstance(block_class, type) and issubclass(block_class, CurvatureBlock)):
        raise TypeError(f"`block_class` must be a tf_kfac.blocks.CurvatureBlock subclass; "
                        f"received {block_class!r}.")
    _BLOCK_TYPES[:] = [(layer_class, block_class)] + [
        entry for entry in _BLOCK_TYPES if entry[0] is not layer_class]


def block_type_for(layer: keras.layers.Layer) -> type[CurvatureBlock] | None:
    for layer_class, block_type in _BLOCK_TYPES:
        if isinstance(layer, layer_class):
            return block_type
    return None


def blocks_for_model(
    layers: Sequence[keras.layers.Layer], var_list: Sequence[keras.Variable],
    weight_sharing: str | Mapping[str, str] = "expand", curvature: str = "kfac",
) -> list[CurvatureBlock]:
    """One block per registered layer kind, one first-order block per other variable.

    `weight_sharing` is the flavour of every Kronecker block that supports it,
    or a mapping from layer names to flavours ("expand" for the others).
    `curvature="ekfac"` gives the Kronecker kinds that have one their EKFAC
    variant (`blocks/ekfac.py`); the other kinds keep their blocks.
    The order of the blocks follows `var_list` (by the first variable of each
    block), so it depends only on the model, never on the order of calls.
    """
    if not isinstance(weight_sharing, str):
        unknown = sorted(set(weight_sharing) - {layer.name for layer in layers})
        if unknown:
            raise ValueError(f"`weight_sharing` names layers that the model does not have: "
                             f"{unknown}.")
    trainable_ids = {id(v) for v in var_list}
    owner: dict[int, CurvatureBlock] = {}
    notes: dict[int, str] = {}
    for layer in layers:
        block_type = block_type_for(layer)
        if block_type is None or not layer.built:
            continue
        obstacle = getattr(block_type, "obstacle", None)
        reason = obstacle(layer, trainable_ids) if obstacle is not None else None
        if reason is not None:
            for variable in layer.trainable_variables:
                notes[id(variable)] = f"{type(layer).__name__} '{layer.name}': {reason}"
            continue
        block = block_for(block_type, layer, curvature)
        _set_weight_sharing(block, layer, weight_sharing)
        for variable in block.variables:
            owner.setdefault(id(variable), block)
    blocks: list[CurvatureBlock] = []
    seen: set[int] = set()
    for variable in var_list:
        block = owner.get(id(variable))
        if block is None:
            reason = notes.get(id(variable), "no curvature block for this layer kind")
            blocks.append(FirstOrderBlock(variable, reason))
        elif id(block) not in seen:
            seen.add(id(block))
            blocks.append(block)
    return blocks


def _set_weight_sharing(block, layer, weight_sharing) -> None:
    if not isinstance(block, KroneckerBlock):
        return
    if isinstance(weight_sharing, str):
        flavour, asked = weight_sharing, False
    else:
        flavour, asked = weight_sharing.get(layer.name, "expand"), layer.name in weight_sharing
    if flavour in block.weight_sharing_flavours:
        block.weight_sharing = flavour
    elif asked:
        raise ValueError(
            f"`weight_sharing` asks for {flavour!r} on layer '{layer.name}', but its "
            f"{type(block).__name__} supports only "
            f"{', '.join(map(repr, block.weight_sharing_flavours))}.")
