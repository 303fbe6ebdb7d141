"""Overlays of segmentation results for people to look at: category colours, labels and segment outlines.

PIL and numpy only. The three functions take what the post-processing returns (and what ground truth looks like
after decoding), so a prediction and its ground truth are drawn by the same code:

- :func:`draw_semantic_segmentation`: a ``(H, W)`` map of label ids;
- :func:`draw_panoptic_segmentation`: a ``(H, W)`` map of segment ids plus ``segments_info`` (``id``, ``label_id``,
  optional ``score``);
- :func:`draw_instance_segmentation`: the same, or ``(N, H, W)`` binary maps (``return_binary_maps=True``), which may
  overlap.

Colours depend only on the label id (and, for things, on the instance), so the same class has the same colour in
every picture.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Segments smaller than this fraction of the image get an outline but no text label: their text would cover them.
MIN_LABELLED_AREA_FRACTION = 0.002
# Shade cycles for the instances of one category (lengths 5 and 3, so 15 instances before a repeat).
_INSTANCE_HUE_SHIFTS = (0.0, 0.05, -0.05, 0.1, -0.1)
_INSTANCE_VALUES = (0.95, 0.7, 0.83)


def category_color(label_id: int, instance_index: int = 0) -> tuple[int, int, int]:
    """A stable, saturated colour for a label id; ``instance_index`` > 0 gives a nearby shade for the next instance.

    Hues step by the golden ratio so that consecutive ids (often related classes) get well-separated colours; the
    instances of one category cycle through small hue shifts and lightness steps so that neighbours stay apart.
    """
    hue = (label_id * 0.618033988749895 + _INSTANCE_HUE_SHIFTS[instance_index % len(_INSTANCE_HUE_SHIFTS)]) % 1.0
    saturation = 0.65 + 0.35 * ((label_id * 7) % 3) / 2  # three saturation levels break up similar hues
    value = _INSTANCE_VALUES[instance_index % len(_INSTANCE_VALUES)]
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(red * 255), int(green * 255), int(blue * 255)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # (C, H, W) -> (H, W, C)
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze()).convert("RGB")


def _check_size(image: Image.Image, height: int, width: int, what: str) -> None:
    if (height, width) != (image.height, image.width):
        raise ValueError(
            f"{what} is {height}x{width} but the image is {image.height}x{image.width}; "
            "post-process with target_sizes=[(image.height, image.width)] so that they match."
        )


def _boundaries(segment_map: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels where the segment id changes to a neighbour's, grown to ``thickness`` pixels. (H, W) -> (H, W) bool."""
    edges = np.zeros(segment_map.shape, dtype=bool)
    horizontal = segment_map[:, 1:] != segment_map[:, :-1]
    vertical = segment_map[1:, :] != segment_map[:-1, :]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    for _ in range(max(thickness - 2, 0) // 2):  # dilate by one pixel per step
        grown = edges.copy()
        grown[1:, :] |= edges[:-1, :]
        grown[:-1, :] |= edges[1:, :]
        grown[:, 1:] |= edges[:, :-1]
        grown[:, :-1] |= edges[:, 1:]
        edges = grown
    return edges


def _label_anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """A point well inside the mask for its text: the mask pixel nearest to the median of its pixels. -> (x, y)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    median_y, median_x = np.median(ys), np.median(xs)
    nearest = np.argmin((ys - median_y) ** 2 + (xs - median_x) ** 2)
    return int(xs[nearest]), int(ys[nearest])


def _font(image: Image.Image) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(12, round(min(image.size) / 30))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_labels(image: Image.Image, labels: list[tuple[tuple[int, int], str, tuple[int, int, int]]]) -> None:
    """Write each text centred on its anchor, on a box of its segment's colour, white or black for contrast.

    A text that would overlap one already written moves half a line down or up; if both collide it is left out,
    so crowded scenes stay readable.
    """
    draw = ImageDraw.Draw(image)
    font = _font(image)
    padding = max(1, font.size // 6) if hasattr(font, "size") else 1
    taken: list[tuple[int, int, int, int]] = []
    for (x, y), text, color in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left, bottom - top
        placed = None
        for shift in (0, height + 2 * padding, -(height + 2 * padding)):
            # keep the box inside the image
            x0 = int(min(max(x - width / 2, padding), image.width - width - padding))
            y0 = int(min(max(y + shift - height / 2, padding), image.height - height - padding))
            box = (x0 - padding, y0 - padding, x0 + width + padding, y0 + height + padding)
            if not any(box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]
                       for other in taken):  # fmt: skip
                placed = (x0, y0, box)
                break
        if placed is None:
            continue
        x0, y0, box = placed
        taken.append(box)
        box_color = tuple(int(channel * 0.75) for channel in color)
        luminance = 0.299 * box_color[0] + 0.587 * box_color[1] + 0.114 * box_color[2]
        text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.rectangle(box, fill=box_color)
        draw.text((x0 - left, y0 - top), text, fill=text_color, font=font)


def _label_text(label_id: int, id2label: Mapping[int, str] | None, score: float | None) -> str:
    name = str(label_id) if id2label is None else str(id2label.get(label_id, id2label.get(str(label_id), label_id)))
    name = name.strip().split(",")[0].removesuffix("-merged").removesuffix("-other")
    return name if score is None else f"{name} {score:.0%}"


def _compose(
    image: Image.Image,
    layers: list[tuple[np.ndarray, tuple[int, int, int], str]],
    alpha: float,
    outline_map: np.ndarray,
    labelled: bool,
) -> Image.Image:
    """Blend each (mask, colour, text) layer over the image, draw the outlines of ``outline_map``, then the texts."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    # paint the colours on one layer first, so that an overlapping later segment replaces (not tints) an earlier one
    colors = np.zeros_like(pixels)
    painted = np.zeros(pixels.shape[:2], dtype=bool)
    for mask, color, _ in layers:
        colors[mask] = color
        painted |= mask
    pixels[painted] = (1 - alpha) * pixels[painted] + alpha * colors[painted]
    thickness = max(2, round(min(image.size) / 300))
    pixels[_boundaries(outline_map, thickness)] = 255.0  # white outlines separate same-coloured neighbours
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    if labelled:
        minimum_area = MIN_LABELLED_AREA_FRACTION * image.width * image.height
        labels = []
        for mask, color, text in layers:
            anchor = _label_anchor(mask) if mask.sum() >= minimum_area else None
            if anchor is not None and text:
                labels.append((anchor, text, color))
        _draw_labels(canvas, labels)
    return canvas


def draw_semantic_segmentation(
    image: Image.Image | np.ndarray,
    segmentation: Any,
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
    ignore_value: int | None = 255,
    labelled: bool = True,
) -> Image.Image:
    """Colour every pixel by its class, outline the class regions and name them.

    Args:
        image (`PIL.Image.Image` or `np.ndarray` of shape `(H, W, 3)`): the picture.
        segmentation (`torch.Tensor` or `np.ndarray` of shape `(H, W)`): label id per pixel, as returned by
            `post_process_semantic_segmentation`; ``ignore_value`` pixels are left uncoloured.
        id2label (`Mapping[int, str]`, *optional*): class names (a model's `config.id2label`).
        alpha (`float`): opacity of the colours.
        labelled (`bool`): write class names.

    Returns:
        `PIL.Image.Image`: an RGB image of the input's size.
    """
    canvas = _as_rgb(image)
    label_map = _to_numpy(segmentation).astype(np.int64)
    if label_map.ndim != 2:
        raise ValueError(f"segmentation must be (H, W) label ids, got shape {label_map.shape}.")
    _check_size(canvas, *label_map.shape, "the segmentation")
    layers = []
    for label_id in np.unique(label_map):
        if ignore_value is not None and label_id == ignore_value:
            continue
        layers.append(
            (label_map == label_id, category_color(int(label_id)), _label_text(int(label_id), id2label, None))
        )
    return _compose(canvas, layers, alpha, label_map, labelled)


def draw_panoptic_segmentation(
    image: Image.Image | np.ndarray,
    segmentation: Any,
    segments_info: Sequence[Mapping[str, Any]],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
    labelled: bool = True,
) -> Image.Image:
    """Colour every segment by its category (instances of a category in shades of it), outline and name it.

    Args:
        image (`PIL.Image.Image` or `np.ndarray` of shape `(H, W, 3)`): the picture.
        segmentation (`torch.Tensor` or `np.ndarray` of shape `(H, W)`): segment id per pixel, as returned by
            `post_process_panoptic_segmentation` (or `post_process_instance_segmentation`); ids not in
            ``segments_info`` (0 or -1 for "nothing") are left uncoloured.
        segments_info (`list[dict]`): one dict per segment with ``id``, ``label_id`` (or ``category_id`` as in COCO
            annotations) and optionally ``score``.
        id2label (`Mapping[int, str]`, *optional*): category names by label id.

    Returns:
        `PIL.Image.Image`: an RGB image of the input's size.
    """
    canvas = _as_rgb(image)
    segment_map = _to_numpy(segmentation).astype(np.int64)
    if segment_map.ndim != 2:
        raise ValueError(
            f"segmentation must be (H, W) segment ids, got shape {segment_map.shape}; "
            "for (N, H, W) binary maps use draw_instance_segmentation."
        )
    _check_size(canvas, *segment_map.shape, "the segmentation")
    masks = [segment_map == int(segment["id"]) for segment in segments_info]
    return _draw_segments(canvas, masks, segments_info, id2label, alpha, segment_map, labelled)


def draw_instance_segmentation(
    image: Image.Image | np.ndarray,
    segmentation: Any,
    segments_info: Sequence[Mapping[str, Any]],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
    labelled: bool = True,
) -> Image.Image:
    """Draw instances: a `(H, W)` segment-id map (as panoptic) or `(N, H, W)` binary maps, one per segment.

    Binary maps may overlap; they are drawn in order, so later (lower-scored) instances paint over earlier ones,
    and every instance keeps its own outline.

    Args:
        image (`PIL.Image.Image` or `np.ndarray` of shape `(H, W, 3)`): the picture.
        segmentation (`torch.Tensor` or `np.ndarray` of shape `(H, W)` or `(N, H, W)`): the instances.
        segments_info (`list[dict]`): ``id``, ``label_id``, optionally ``score``; with binary maps, entry ``i``
            describes map ``i``.
        id2label (`Mapping[int, str]`, *optional*): category names by label id.

    Returns:
        `PIL.Image.Image`: an RGB image of the input's size.
    """
    maps = _to_numpy(segmentation)
    if maps.ndim == 2:
        return draw_panoptic_segmentation(image, maps, segments_info, id2label, alpha, labelled)
    canvas = _as_rgb(image)
    if maps.ndim != 3 or maps.shape[0] != len(segments_info):
        raise ValueError(
            f"binary maps must be (N, H, W) with N = len(segments_info) = {len(segments_info)}, got {maps.shape}."
        )
    _check_size(canvas, *maps.shape[1:], "the binary maps")
    masks = [mask.astype(bool) for mask in maps]
    # outlines of overlapping masks: a map where each pixel holds the last instance covering it
    outline_map = np.zeros(maps.shape[1:], dtype=np.int64)
    for index, mask in enumerate(masks):
        outline_map[mask] = index + 1
    return _draw_segments(canvas, masks, segments_info, id2label, alpha, outline_map, labelled)


def _draw_segments(
    canvas: Image.Image,
    masks: list[np.ndarray],
    segments_info: Sequence[Mapping[str, Any]],
    id2label: Mapping[int, str] | None,
    alpha: float,
    outline_map: np.ndarray,
    labelled: bool,
) -> Image.Image:
    instances_seen: dict[int, int] = {}
    layers = []
    for mask, segment in zip(masks, segments_info):
        label_id = int(segment["label_id"] if "label_id" in segment else segment["category_id"])
        instance_index = instances_seen.get(label_id, 0)
        instances_seen[label_id] = instance_index + 1
        score = segment.get("score")
        text = _label_text(label_id, id2label, None if score is None else float(score))
        layers.append((mask, category_color(label_id, instance_index), text))
    return _compose(canvas, layers, alpha, outline_map, labelled)


__all__ = [
    "category_color",
    "draw_instance_segmentation",
    "draw_panoptic_segmentation",
    "draw_semantic_segmentation",
]
