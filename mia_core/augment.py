"""Query augmentations for image-shaped records: the attacker queries the model on a few
transformed copies of each record and combines the evidence (Carlini et al. 2022, Sec. VI-B:
"Augmentations"; their reference code queries mirror x 9 shifts = 18 views of CIFAR images).

Pure functions of numpy arrays. A record is a flat row of ``D = prod(image_shape)`` features laid
out row-major as ``(H, W)`` or ``(C, H, W)``. The views are

* ``none``: the record itself (one view);
* ``mirror``: the record and its left-right mirror image (two views);
* ``mirror-shift``: both of those, each translated by every ``(dy, dx)`` in
  ``{-s, 0, s}^2`` with zero fill (``s = shift`` pixels), ``2 * 9 = 18`` views. The reference code
  pads by reflection and crops; zero fill is used here because the background of the images
  miafw ships (digits) is 0, so a shifted digit stays a plausible digit.

The first view is always the unmodified record.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

AUGMENTATIONS = ("none", "mirror", "mirror-shift")


def view_specs(kind: str, *, shift: int = 1) -> List[Tuple[bool, int, int]]:
    """The views of ``kind`` as ``(mirrored, dy, dx)`` triples, the unmodified record first."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {kind!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 1:
        raise ValueError(f"shift must be an integer >= 1 (pixels), got {shift!r}")
    if kind == "none":
        return [(False, 0, 0)]
    if kind == "mirror":
        return [(False, 0, 0), (True, 0, 0)]
    offsets = [0, -shift, shift]
    return [(m, dy, dx) for m in (False, True) for dy in offsets for dx in offsets]


def _translate(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift the last two axes by ``(dy, dx)`` pixels, filling with zeros."""
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = img[..., ys, xs]
    return out


def augment_records(x: np.ndarray, *, image_shape: Sequence[int], kind: str, shift: int = 1) -> np.ndarray:
    """The augmented views of records ``x``.

    Args:
        x: float ``[N, D]`` records, ``D = prod(image_shape)``.
        image_shape: ``(H, W)`` or ``(C, H, W)``.
        kind: one of :data:`AUGMENTATIONS`; shift: pixels for ``mirror-shift``.

    Returns:
        ``[A, N, D]`` in ``x``'s dtype, ``A = len(view_specs(kind))``; ``[0]`` equals ``x``.
    """
    x = np.asarray(x)
    shape = tuple(int(d) for d in image_shape)
    if x.ndim != 2 or len(shape) not in (2, 3) or int(np.prod(shape)) != x.shape[1]:
        raise ValueError(f"records of shape {x.shape} are not images of shape {shape}")
    imgs = x.reshape((x.shape[0],) + shape)
    views = []
    for mirrored, dy, dx in view_specs(kind, shift=shift):
        v = imgs[..., ::-1] if mirrored else imgs
        v = _translate(v, dy, dx) if (dy or dx) else v
        views.append(np.ascontiguousarray(v).reshape(x.shape))
    return np.stack(views)


__all__ = ["AUGMENTATIONS", "augment_records", "view_specs"]
