"""Joint image + segment-map augmentations of the paper, on segmentation records (``training/data/records.py``).

API
---
Each augmentation is a picklable callable ``record -> record``: it reads ``record["image"]`` (PIL image or
``(H, W, 3)`` uint8 array) and ``record["segment_map"]`` (``(H, W)`` int ids, 0 = void), and returns a new record
whose image is a ``(h, w, 3)`` uint8 array, whose segment map is ``(h, w)`` int64, and whose segment lists
(``segment_ids``, ``class_labels``, ``iscrowd``) keep only the segments still visible (a crop can empty a mask; an
image left with no segment is kept: it trains the no-object class).

- ``LargeScaleJitter(output_size=1024, min_scale=0.1, max_scale=2.0, flip_prob=0.5, pad=False)``: COCO recipe
  (resize so the image fits ``output_size * scale``, random fixed-size crop, horizontal flip).
- ``ShortSideScaleCrop(base_size=512, min_ratio=0.5, max_ratio=2.0, crop_size=512, category_max_ratio=1.0, ...)``:
  ADE20K recipe (short side = ratio x 512 from {256, 307, ..., 1024}, long side <= 2048, crop 512 retried until no
  class covers more than ``category_max_ratio`` of the crop, SSD photometric distortion, horizontal flip).
- ``PhotometricDistortion()``, ``RandomHorizontalFlip(prob)``, ``Compose([...])``: the building blocks.
- ``build_train_transform(recipe, **kwargs)``: ``"coco_lsj"`` | ``"ade20k"`` | ``"flip"`` | ``"none"`` (the recipes'
  ``augmentation.name``).

Randomness: pass ``seed=`` for a reproducible stream; by default Python's ``random`` is used, which PyTorch
reseeds in every DataLoader worker, so workers do not repeat each other's augmentations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..processing.image_io import to_rgb
from .data.records import SegmentationRecord, keep_visible_segments


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def _resize(image: np.ndarray, segment_map: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear for the image, nearest for the ids (ids must never be interpolated)."""
    if (height, width) == segment_map.shape:
        return image, segment_map
    resized_image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    # mode "I" holds int32: COCO ids (< 2^24) fit
    resized_map = Image.fromarray(segment_map.astype(np.int32), mode="I").resize((width, height), Image.NEAREST)
    return resized_image, np.asarray(resized_map).astype(np.int64)


class _RandomMixin:
    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed) if seed is not None else random


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[SegmentationRecord], SegmentationRecord]]):
        self.transforms = list(transforms)

    def __call__(self, record: SegmentationRecord) -> SegmentationRecord:
        for transform in self.transforms:
            record = transform(record)
        return record


class RandomHorizontalFlip(_RandomMixin):
    """Mirror image and segment map left-right with probability ``prob``."""

    def __init__(self, prob: float = 0.5, seed: int | None = None):
        super().__init__(seed)
        self.prob = prob

    def __call__(self, record: SegmentationRecord) -> SegmentationRecord:
        image, segment_map = _as_array(record["image"]), np.asarray(record["segment_map"])
        if self.rng.random() < self.prob:
            image, segment_map = image[:, ::-1], segment_map[:, ::-1]
        return {**record, "image": np.ascontiguousarray(image), "segment_map": np.ascontiguousarray(segment_map)}


def _random_crop_box(rng, height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int, int, int]:
    crop_height, crop_width = min(crop_height, height), min(crop_width, width)
    top = rng.randint(0, height - crop_height)
    left = rng.randint(0, width - crop_width)
    return top, left, crop_height, crop_width


class LargeScaleJitter(_RandomMixin):
    """COCO large-scale jitter: random scale in ``[min_scale, max_scale]`` of ``output_size``, fixed-size crop, flip.

    The image is resized (aspect ratio kept) to fit in ``output_size * scale`` squared, then a random
    ``output_size`` x ``output_size`` window is cropped (the whole image when it is smaller). With ``pad=True`` the
    result is padded to exactly ``output_size`` (image with ``pad_value``, ids with 0 = void); by default padding is
    left to the processor, whose ``pixel_mask`` marks it.

    Args:
        output_size: crop side (1024 in the paper).
        min_scale, max_scale: scale range (0.1 and 2.0 in the paper).
        flip_prob: probability of a horizontal flip.
        seed: for a reproducible stream of random draws.
    """

    def __init__(
        self,
        output_size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        flip_prob: float = 0.5,
        pad: bool = False,
        pad_value: int = 128,
        seed: int | None = None,
    ):
        super().__init__(seed)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.output_size, self.min_scale, self.max_scale = output_size, min_scale, max_scale
        self.flip = RandomHorizontalFlip(flip_prob)
        self.flip.rng = self.rng
        self.pad, self.pad_value = pad, pad_value

    def __call__(self, record: SegmentationRecord) -> SegmentationRecord:
        image, segment_map = _as_array(record["image"]), np.asarray(record["segment_map"])
        height, width = segment_map.shape
        scale = self.rng.uniform(self.min_scale, self.max_scale)
        target = self.output_size * scale
        factor = min(target / height, target / width)
        new_height, new_width = max(1, round(height * factor)), max(1, round(width * factor))
        image, segment_map = _resize(image, segment_map, new_height, new_width)
        top, left, crop_height, crop_width = _random_crop_box(
            self.rng, new_height, new_width, self.output_size, self.output_size
        )
        image = image[top : top + crop_height, left : left + crop_width]
        segment_map = segment_map[top : top + crop_height, left : left + crop_width]
        if self.pad and (crop_height, crop_width) != (self.output_size, self.output_size):
            padded_image = np.full((self.output_size, self.output_size, 3), self.pad_value, dtype=np.uint8)
            padded_map = np.zeros((self.output_size, self.output_size), dtype=np.int64)
            padded_image[:crop_height, :crop_width] = image
            padded_map[:crop_height, :crop_width] = segment_map
            image, segment_map = padded_image, padded_map
        record = self.flip({**record, "image": image, "segment_map": segment_map})
        return keep_visible_segments(record)


class PhotometricDistortion(_RandomMixin):
    """SSD-style colour jitter (as MaskFormer / mmseg use for ADE20K), each step with probability 0.5.

    Brightness ``+U(-32, 32)``; contrast ``xU(0.5, 1.5)`` (before or after the HSV steps, at random); saturation
    ``xU(0.5, 1.5)``; hue ``+U{-18..18}`` in OpenCV's 0-180 hue units. Only the image changes.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        seed: int | None = None,
    ):
        super().__init__(seed)
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_delta = contrast_range, saturation_range, hue_delta

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if self.rng.random() < 0.5:
            image = image * self.rng.uniform(*self.contrast_range)
        return image

    def __call__(self, record: SegmentationRecord) -> SegmentationRecord:
        image = _as_array(record["image"]).astype(np.float32)
        if self.rng.random() < 0.5:
            image = image + self.rng.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = self.rng.random() < 0.5
        if contrast_first:
            image = self._contrast(image)
        image = np.clip(image, 0, 255)
        change_saturation = self.rng.random() < 0.5
        change_hue = self.rng.random() < 0.5
        if change_saturation or change_hue:
            hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).astype(np.float32)
            if change_saturation:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.rng.uniform(*self.saturation_range), 0, 255)
            if change_hue:
                # PIL's hue runs 0-255 for a full turn, OpenCV's 0-180
                hsv[..., 0] = (hsv[..., 0] + self.rng.randint(-self.hue_delta, self.hue_delta) * 256 / 180) % 256
            image = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)
        if not contrast_first:
            image = self._contrast(image)
        return {**record, "image": np.clip(image, 0, 255).astype(np.uint8)}


class ShortSideScaleCrop(_RandomMixin):
    """ADE20K semantic recipe: short-side jitter, category-constrained crop, photometric distortion, flip.

    Args:
        base_size: 512; the short side is drawn from ``{int(base_size * r / 10) for r in 10*min_ratio..10*max_ratio}``
            (256, 307, ..., 1024 as in the paper's code), the long side capped at ``max_size``.
        crop_size: side of the random crop (the whole image when smaller).
        category_max_ratio: a crop is redrawn (up to 10 times) while one class covers ``>= category_max_ratio`` of
            its labelled pixels or only one class is visible; ``1.0`` (the paper's ADE20K setting) disables the check.
        photometric: apply ``PhotometricDistortion``.
    """

    def __init__(
        self,
        base_size: int = 512,
        min_ratio: float = 0.5,
        max_ratio: float = 2.0,
        crop_size: int = 512,
        category_max_ratio: float = 1.0,
        max_size: int = 2048,
        photometric: bool = True,
        flip_prob: float = 0.5,
        seed: int | None = None,
    ):
        super().__init__(seed)
        steps = range(round(min_ratio * 10), round(max_ratio * 10) + 1)
        self.short_sides = [int(base_size * step / 10) for step in steps]
        self.crop_size, self.category_max_ratio, self.max_size = crop_size, category_max_ratio, max_size
        self.photometric = PhotometricDistortion() if photometric else None
        self.flip = RandomHorizontalFlip(flip_prob)
        for part in (self.photometric, self.flip):
            if part is not None:
                part.rng = self.rng

    def _crop_is_balanced(self, labels: np.ndarray) -> bool:
        counts = np.bincount(labels[labels >= 0].ravel())
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() < self.category_max_ratio * counts.sum()

    def __call__(self, record: SegmentationRecord) -> SegmentationRecord:
        image, segment_map = _as_array(record["image"]), np.asarray(record["segment_map"])
        height, width = segment_map.shape
        short_side = self.rng.choice(self.short_sides)
        factor = short_side / min(height, width)
        factor = min(factor, self.max_size / max(height, width))
        new_height, new_width = max(1, round(height * factor)), max(1, round(width * factor))
        image, segment_map = _resize(image, segment_map, new_height, new_width)
        box = _random_crop_box(self.rng, new_height, new_width, self.crop_size, self.crop_size)
        if self.category_max_ratio < 1.0:
            # per-pixel class labels (-1 = void) to measure how much of a crop one class takes
            lookup = dict(zip(record["segment_ids"], record["class_labels"]))
            ids = np.unique(segment_map)
            label_of = np.asarray([lookup.get(int(i), -1) for i in ids])
            labels = label_of[np.searchsorted(ids, segment_map)]
            for _ in range(10):
                top, left, crop_height, crop_width = box
                if self._crop_is_balanced(labels[top : top + crop_height, left : left + crop_width]):
                    break
                box = _random_crop_box(self.rng, new_height, new_width, self.crop_size, self.crop_size)
        top, left, crop_height, crop_width = box
        record = {
            **record,
            "image": image[top : top + crop_height, left : left + crop_width],
            "segment_map": segment_map[top : top + crop_height, left : left + crop_width],
        }
        if self.photometric is not None:
            record = self.photometric(record)
        return keep_visible_segments(self.flip(record))


def build_train_transform(
    recipe: str | None, **kwargs: Any
) -> Callable[[SegmentationRecord], SegmentationRecord] | None:
    """A recipe's augmentation by name: ``"coco_lsj"`` -> ``LargeScaleJitter(**kwargs)``; ``"ade20k"`` ->
    ``ShortSideScaleCrop(**kwargs)``; ``"flip"`` -> ``RandomHorizontalFlip(kwargs["flip_prob"])`` (images already at
    training size, as synthetic-shapes); ``"none"`` -> ``None``."""
    if recipe == "coco_lsj":
        return LargeScaleJitter(**kwargs)
    if recipe == "ade20k":
        return ShortSideScaleCrop(**kwargs)
    if recipe == "flip":
        return RandomHorizontalFlip(prob=kwargs.pop("flip_prob", 0.5), **kwargs)
    if recipe in ("none", None):
        return None
    raise ValueError(f"unknown augmentation recipe {recipe!r}; use 'coco_lsj', 'ade20k', 'flip' or 'none'")
