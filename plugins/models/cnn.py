"""A small convolutional network for image-shaped records (``digits:image=true``, ``cifar10``)."""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Tuple

import torch
from torch import nn

from mia_core.base import ModelFamily
from mia_core.params import ParamError

NORMS = ("none", "group")

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?$")


def parse_image_shape(text: str) -> Optional[Tuple[int, int, int]]:
    """``"CxHxW"`` (or ``"HxW"``, one channel) as ``(C, H, W)``; ``""`` gives ``None`` (infer).

    Raises:
        ValueError: anything else, or a dimension below 1.
    """
    if text is None or str(text).strip() == "":
        return None
    m = _SHAPE.match(str(text))
    if not m:
        raise ValueError(f"image_shape must be CxHxW (e.g. 3x32x32) or HxW, got {text!r}")
    dims = [int(g) for g in m.groups() if g is not None]
    shape = tuple(dims) if len(dims) == 3 else (1, dims[0], dims[1])
    if min(shape) < 1:
        raise ValueError(f"image_shape dimensions must be >= 1, got {text!r}")
    return shape  # type: ignore[return-value]


def infer_image_shape(n_features: int) -> Tuple[int, int, int]:
    """``(1, s, s)`` when ``n_features == s * s``, ``(3, s, s)`` when ``n_features == 3 * s * s``.

    Raises:
        ParamError: neither (pass ``image_shape=CxHxW``).
    """
    s = math.isqrt(n_features)
    if n_features >= 1 and s * s == n_features:
        return (1, s, s)
    if n_features >= 3 and n_features % 3 == 0:
        s = math.isqrt(n_features // 3)
        if s * s * 3 == n_features:
            return (3, s, s)
    raise ParamError(f"cnn: cannot infer an image shape from {n_features} features (neither s*s nor 3*s*s); "
                     f"pass --model cnn:image_shape=CxHxW with C*H*W = {n_features}")


def _groups(channels: int, most: int = 4) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that is <= ``most``
    (``min(4, channels)`` whenever that divides, e.g. for every power of two)."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


class ConvNet(nn.Module):
    """The module :meth:`CNN.build` returns: float ``[B, C*H*W]`` -> logits ``[B, n_classes]``.

    Parameter-only (no buffers, no in-place state), so ``torch.func.functional_call`` and
    ``torch.vmap`` over stacked copies compute exactly what each copy computes on its own.
    """

    def __init__(self, image_shape: Tuple[int, int, int], n_classes: int, *, channels: int, depth: int,
                 norm: str, width: int):
        super().__init__()
        self.image_shape = tuple(int(d) for d in image_shape)
        c, h, w = self.image_shape
        blocks = []
        for i in range(depth):
            out = channels * 2 ** i
            layers = [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if norm == "group":
                layers.append(nn.GroupNorm(_groups(out), out))
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(*layers))
            c = out
        self.features = nn.Sequential(*blocks)
        flat = c * h * w
        head = [nn.Flatten()]
        if width:
            head += [nn.Linear(flat, width), nn.ReLU()]
            flat = width
        head.append(nn.Linear(flat, n_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)  # row-major flattening: [B, C*H*W] -> [B, C, H, W]
        return self.head(self.features(x))


class CNN(ModelFamily):
    """Small convolutional network for records that are flattened images.

    Architecture (``C x H x W`` input, ``k = channels``)::

        reshape [B, C*H*W] -> [B, C, H, W]            (row-major, channel first)
        depth x block i (i = 0 .. depth-1):
            Conv2d(3x3, padding 1) to k * 2**i channels
            ReLU
            GroupNorm(min(4, channels) groups)        (norm=group only; never BatchNorm)
            MaxPool2d(2x2)                            (while the map is at least 2x2)
        Flatten
        Linear -> width, ReLU                         (width > 0 only)
        Linear -> n_classes

    The channels double per block as in the CNNs of Carlini et al.'s LiRA code. GroupNorm uses the
    largest divisor of the block's channels that is at most 4 (``min(4, channels)`` for every
    power of two). The module has parameters only (no running statistics), so the population
    trains all its models as one ``vmap``-ed ensemble.

    The records must be images flattened row-major, channel first (``Records.image_shape``
    ``(C, H, W)``; ``digits:image=true``, ``cifar10``). The model family only learns the number of
    features, so the shape is inferred: ``s*s`` features are a ``1 x s x s`` image,
    ``3*s*s`` a ``3 x s x s`` one; anything else needs ``image_shape``.

    Args:
        channels: output channels of the first conv block (>= 1); block ``i`` has
            ``channels * 2**i``.
        depth: conv blocks (>= 1).
        norm: ``none`` or ``group`` (GroupNorm after each ReLU).
        width: units of the hidden linear layer before the head (0 = none).
        image_shape: ``CxHxW`` (e.g. ``3x32x32``; ``HxW`` means one channel); empty = infer from
            the number of features.
    """

    api_version = "1.0"

    def __init__(self, channels: int = 16, depth: int = 2, norm: Literal["none", "group"] = "none",
                 width: int = 64, image_shape: str = ""):
        self.channels = channels
        self.depth = depth
        self.norm = norm
        self.width = width
        self.image_shape = image_shape

    def validate(self) -> None:
        for name, low in (("channels", 1), ("depth", 1), ("width", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        parse_image_shape(self.image_shape)

    def input_shape(self, n_features: int) -> Tuple[int, int, int]:
        """The ``(C, H, W)`` image that ``n_features`` flattened features are read as."""
        shape = parse_image_shape(self.image_shape)
        if shape is None:
            return infer_image_shape(n_features)
        if shape[0] * shape[1] * shape[2] != n_features:
            raise ParamError(f"cnn: image_shape={self.image_shape} has {shape[0] * shape[1] * shape[2]} values "
                             f"but the records have {n_features} features")
        return shape

    def build(self, n_features: int, n_classes: int) -> nn.Module:
        self.validate()
        return ConvNet(self.input_shape(n_features), n_classes, channels=self.channels, depth=self.depth,
                       norm=self.norm, width=self.width)
