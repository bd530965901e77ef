"""Augmentation recipes: a space's list of albumentations transforms, built into a Compose.

Recipes are data in the space file (`recipes:`), for example
    flip_shift: [{HorizontalFlip: {p: 0.5}}, {Affine: {translate_percent: [-0.2, 0.2], p: 1.0}}]
and apply to training batches only.
"""
from __future__ import annotations

import inspect
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks the network at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)  # small images: OpenCV's own threads cost more than they give (measured, stack notes)


def build_recipe(steps: list, image_size: int, seed: int | None = None) -> A.Compose | None:
    """A Compose from `[{TransformName: {arg: value}}, ...]`, or None for an empty recipe."""
    if not steps:
        return None
    transforms = []
    for step in steps:
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"each step is a one-key mapping {{TransformName: {{args}}}}, got {step!r}")
        (name, args), = step.items()
        cls = getattr(A, str(name), None)
        if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
            raise ValueError(f"'{name}' is not an albumentations transform")
        args = dict(args or {})
        if "size" in inspect.signature(cls.__init__).parameters and "size" not in args:
            args["size"] = (image_size, image_size)  # crops resize back to the trial's input size
        transforms.append(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}))
    return A.Compose(transforms, seed=seed)


def augment_batch(images: np.ndarray, recipe: A.Compose | None) -> np.ndarray:
    """Apply a recipe to each uint8 HxWx3 image of a batch; the batch comes back in the same shape."""
    if recipe is None:
        return images
    return np.stack([recipe(image=image)["image"] for image in images])
