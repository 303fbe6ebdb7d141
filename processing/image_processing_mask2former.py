"""Mask2Former image processor: resize, rescale, normalise, pad; segmentation maps -> mask and class labels.

A transformers ``BaseImageProcessor`` with transformers' Mask2Former argument names and ``preprocessor_config.json``
format, so ``from_pretrained`` reads every ``facebook/mask2former-*`` processor config and configs we save load in
transformers. Differences from transformers' processor, on purpose:

- the work is done on torch tensors (pass ``device="cuda"`` to run a batch on a GPU);
- segmentation maps keep their integer ids (COCO panoptic ids go up to 256^3; transformers' 8-bit conversion
  raises), and COCO panoptic PNGs can be given as they are, RGB-encoded, with their ``segments_info``;
- padded pixels of the binary targets are 0 (transformers pads them with ``ignore_index``);
- post-processing crops each image's valid region before resizing and has no fixed intermediate size (see
  ``post_processing.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature, get_size_dict
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs

from ..modeling.padding import SIZE_DIVISOR, valid_sizes
from . import post_processing
from .image_inputs import (
    as_list,
    channel_layout,
    per_image,
    resize_image,
    resize_nearest,
    shortest_edge_size,
    to_image_tensor,
    to_map_tensor,
)
from .label_encoding import encode_segmentation_map, lazily_zeroed

_DEFAULT_LONGEST_EDGE = 1333


class Mask2FormerImageProcessorKwargs(ImagesKwargs, total=False):
    """Mask2Former's processor options on top of transformers' `ImagesKwargs`.

    ignore_index: label of pixels that are not a target (with `do_reduce_labels`, former 0 pixels get it).
    do_reduce_labels: subtract 1 from every label and turn 0 into `ignore_index` (ADE20K, where 0 = "other").
    num_labels: number of classes (kept for transformers' config format).
    size_divisor: resized sizes are rounded up to a multiple of it, and padding too (Swin needs 32).
    pad_size: pad every image to this `{"height", "width"}` instead of the batch maximum.
    """

    ignore_index: int | None
    do_reduce_labels: bool
    num_labels: int | None
    size_divisor: int
    pad_size: SizeDict | None


class Mask2FormerImageProcessor(BaseImageProcessor):
    r"""Prepares images (and segmentation maps) for Mask2Former and turns its outputs into segmentations.

    `processor(images, segmentation_maps=None, instance_id_to_semantic_id=None, segments_info=None,
    return_tensors="pt")` returns a `BatchFeature` with

    - `pixel_values (B, 3, H, W)`: resized, rescaled, normalised, padded at the bottom and right to the batch maximum
      (a multiple of `size_divisor`);
    - `pixel_mask (B, H, W)`: 1 on real pixels, 0 on padding;
    - with maps, `mask_labels`: a list of `(N_i, H, W)` float binary masks and `class_labels`: a list of `(N_i,)`
      long class ids, one entry per image (`N_i` may be 0).

    So `model(**processor(images, return_tensors="pt"))` works. The `post_process_*` methods take the model outputs
    and return transformers' formats; they crop the valid region of each image (recomputed from `target_sizes`,
    or given by `pixel_mask`) before resizing.

    Args:
        do_resize (`bool`, defaults to `True`): resize so that the shortest edge is `size["shortest_edge"]` and the
            longest at most `size["longest_edge"]`, or to `size["height"] x size["width"]`.
        size (`dict` or `int`, defaults to `{"shortest_edge": 800, "longest_edge": 1333}`): an int means the
            shortest edge; a missing longest edge defaults to `max_size` or 1333, as transformers 4 did.
        size_divisor (`int`, defaults to 32): resized sizes and padding are rounded up to a multiple of it.
        resample (`PILImageResampling`, defaults to bilinear): image resampling (antialiased, like PIL).
        do_rescale, rescale_factor (`1/255`), do_normalize, image_mean, image_std: as in transformers.
        ignore_index (`int`, optional): label ignored in segmentation maps.
        do_reduce_labels (`bool`, defaults to `False`): ADE20K-style label reduction (needs `ignore_index`).
        num_labels (`int`, optional): number of classes.
    """

    valid_kwargs = Mask2FormerImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 800, "longest_edge": _DEFAULT_LONGEST_EDGE}
    default_to_square = False
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    size_divisor = SIZE_DIVISOR
    ignore_index = None
    do_reduce_labels = False
    num_labels = None
    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(self, **kwargs: Any) -> None:
        # Keys older transformers versions wrote into the Hub configs.
        if "reduce_labels" in kwargs:
            reduce_labels = kwargs.pop("reduce_labels")
            kwargs.setdefault("do_reduce_labels", reduce_labels)
        max_size = kwargs.pop("max_size", None)
        legacy_max_size = kwargs.pop("_max_size", None)
        max_size = max_size or legacy_max_size or _DEFAULT_LONGEST_EDGE
        size = kwargs.pop("size", None)
        kwargs["size"] = _size_dict(dict(self.size) if size is None else size, max_size)
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers writes it (`image_processor_type` "Mask2FormerImageProcessor")."""
        output = super().to_dict()
        for key in ("_max_size", "max_size", "reduce_labels"):
            output.pop(key, None)
        if isinstance(output.get("resample"), PILImageResampling):
            output["resample"] = int(output["resample"])
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------------------------------------

    def resized_size(
        self,
        height: int,
        width: int,
        size: SizeDict | dict | None = None,
        size_divisor: int | None = None,
        do_resize: bool | None = None,
    ) -> tuple[int, int]:
        """The `(height, width)` an image of `(height, width)` has after preprocessing, before padding.

        Shortest/longest edge keeps the aspect ratio (rounding as transformers does), `height`/`width` is taken as
        given; the result is rounded up to a multiple of `size_divisor` when resizing, as in transformers.
        """
        do_resize = self.do_resize if do_resize is None else do_resize
        if not do_resize:
            return int(height), int(width)
        size = SizeDict(**dict(size if size is not None else self.size))
        size_divisor = self.size_divisor if size_divisor is None else size_divisor
        if size.shortest_edge:
            new_height, new_width = shortest_edge_size(
                height, width, size.shortest_edge, size.longest_edge or _DEFAULT_LONGEST_EDGE
            )
        elif size.height and size.width:
            new_height, new_width = size.height, size.width
        elif size.max_height and size.max_width:
            scale = min(size.max_height / height, size.max_width / width)
            new_height, new_width = int(height * scale), int(width * scale)
        else:
            raise ValueError(
                f"`size` must hold 'shortest_edge' (and optionally 'longest_edge'), or 'height' and 'width'; got "
                f"{dict(size)}."
            )
        if size_divisor:
            new_height = math.ceil(new_height / size_divisor) * size_divisor
            new_width = math.ceil(new_width / size_divisor) * size_divisor
        return int(new_height), int(new_width)

    # ----------------------------------------------------------------------------------------------------------------
    # Preprocessing
    # ----------------------------------------------------------------------------------------------------------------

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None = None,
        segments_info: list[list[dict[str, Any]]] | list[dict[str, Any]] | None = None,
        do_resize: bool | None = None,
        size: dict[str, int] | int | None = None,
        size_divisor: int | None = None,
        resample: PILImageResampling | int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        pad_size: dict[str, int] | None = None,
        return_tensors: str | None = None,
        device: str | torch.device | None = None,
        input_data_format: str | ChannelDimension | None = None,
        data_format: str | ChannelDimension = ChannelDimension.FIRST,
        **kwargs: Any,
    ) -> BatchFeature:
        r"""Preprocesses an image or a batch of images, and optionally their segmentation maps.

        Args:
            images: a PIL image, a numpy array or torch tensor (HWC or CHW, see `input_data_format`; 8 or 16 bit:
                uint8, uint16, integer or float pixels, 16-bit ones scaled to 0-255), a file path, or a list of them
                (sizes may differ). Images keep their channels when `image_mean`/`image_std` have as many values;
                with 3 values, gray images become RGB and RGBA ones lose their alpha.
            segmentation_maps: one `(H, W)` integer map per image, the size of its image: class ids (semantic),
                instance ids (with `instance_id_to_semantic_id`) or panoptic segment ids (with `segments_info`;
                an RGB COCO panoptic PNG is decoded as R + 256 G + 256^2 B).
            instance_id_to_semantic_id: per image (or one for all) `{instance id: class id}`.
            segments_info: per image the COCO panoptic `segments_info` (`id`, `category_id`, optional `iscrowd`).
                `category_id` is used as the class id as it is. Crowd segments are not made targets, as in the
                original Mask2Former's dataset mapper.
            return_tensors: `"pt"` for torch tensors, `"np"` or None for numpy arrays.
            device: where the tensor work runs (e.g. `"cuda"`); outputs stay there.
            input_data_format: `"channels_first"` or `"channels_last"`, the layout of array and tensor images;
                inferred as transformers does when not given (the first axis when both could be channels).
            data_format: `"channels_first"` (the model's layout) or `"channels_last"` for `pixel_values`.
            Other arguments override the processor's settings for this call.

        Returns:
            `BatchFeature` with `pixel_values (B, 3, H, W)`, `pixel_mask (B, H, W)` and, with maps, `mask_labels`
            (list of `(N_i, H, W)` float) and `class_labels` (list of `(N_i,)` long).
        """
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__)
        if unknown:
            raise ValueError(f"unexpected argument(s) {sorted(unknown)} for {type(self).__name__}.preprocess.")
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else SizeDict(**get_size_dict(_size_dict(size), default_to_square=False))
        size_divisor = self.size_divisor if size_divisor is None else size_divisor
        resample = self.resample if resample is None else resample
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else image_mean
        image_std = self.image_std if image_std is None else image_std
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        do_reduce_labels = self.do_reduce_labels if do_reduce_labels is None else do_reduce_labels
        pad_size = self.pad_size if pad_size is None else pad_size
        if do_reduce_labels and ignore_index is None:
            raise ValueError("`do_reduce_labels=True` needs an `ignore_index` (e.g. 255) for the former 0 pixels.")

        data_format = channel_layout(data_format, "data_format")
        num_channels = _num_channels(image_mean, image_std) if do_normalize else 3
        image_list = [
            to_image_tensor(image, device, num_channels, input_data_format) for image in as_list(images, "images")
        ]
        map_list = None
        if segmentation_maps is not None:
            map_list = [to_map_tensor(item, device) for item in as_list(segmentation_maps, "segmentation_maps")]
            if len(map_list) != len(image_list):
                raise ValueError(f"got {len(image_list)} images but {len(map_list)} segmentation maps; pass one each.")
            for index, (image, segmentation_map) in enumerate(zip(image_list, map_list)):
                if tuple(segmentation_map.shape) != tuple(image.shape[-2:]):
                    raise ValueError(
                        f"segmentation map {index} is {tuple(segmentation_map.shape)} but its image is "
                        f"{tuple(image.shape[-2:])} (height, width); give each map the size of its image."
                    )

        resized_images, resized_maps = [], []
        for index, image in enumerate(image_list):
            new_size = self.resized_size(*image.shape[-2:], size=size, size_divisor=size_divisor, do_resize=do_resize)
            resized_images.append(resize_image(image, new_size, resample))
            if map_list is not None:
                resized_maps.append(resize_nearest(map_list[index], new_size))

        mean = torch.as_tensor(image_mean, dtype=torch.float32, device=resized_images[0].device).view(-1, 1, 1)
        std = torch.as_tensor(image_std, dtype=torch.float32, device=resized_images[0].device).view(-1, 1, 1)
        # Rescale and normalise as one affine step, x * factor / std - mean / std, applied in _encode.
        scale = (rescale_factor if do_rescale else 1.0) / (std if do_normalize else torch.ones_like(std))
        shift = -(mean / std) if do_normalize else torch.zeros_like(mean)
        return self._encode(
            resized_images,
            resized_maps if map_list is not None else None,
            instance_id_to_semantic_id,
            segments_info,
            ignore_index,
            do_reduce_labels,
            size_divisor,
            pad_size,
            return_tensors,
            affine=(scale, shift),
            data_format=data_format,
        )

    def encode_inputs(
        self,
        pixel_values_list: list[Any],
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: list[dict[int, int]] | dict[int, int] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool = False,
        return_tensors: str | None = None,
        segments_info: list[list[dict[str, Any]]] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Pads already preprocessed `(3, H, W)` images and encodes their maps (same sizes), without resizing.

        Returns the same `BatchFeature` as `preprocess`.
        """
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        images = [
            torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image) for image in pixel_values_list
        ]
        for index, image in enumerate(images):
            if image.ndim != 3:
                raise ValueError(
                    f"pixel_values_list[{index}] must be a (C, H, W) array, got shape {tuple(image.shape)}."
                )
        maps = None
        if segmentation_maps is not None:
            maps = [to_map_tensor(item, None) for item in as_list(segmentation_maps, "segmentation_maps")]
            for index, (image, segmentation_map) in enumerate(zip(images, maps)):
                if tuple(segmentation_map.shape) != tuple(image.shape[-2:]):
                    raise ValueError(
                        f"segmentation map {index} is {tuple(segmentation_map.shape)} but its image is "
                        f"{tuple(image.shape[-2:])}; give each map the size of its image."
                    )
        return self._encode(
            [image.float() for image in images],
            maps,
            instance_id_to_semantic_id,
            segments_info,
            ignore_index,
            do_reduce_labels,
            self.size_divisor,
            kwargs.get("pad_size"),
            return_tensors,
        )

    def _encode(
        self,
        images: list[torch.Tensor],
        maps: list[torch.Tensor] | None,
        instance_id_to_semantic_id: Any,
        segments_info: Any,
        ignore_index: int | None,
        do_reduce_labels: bool,
        size_divisor: int,
        pad_size: Any,
        return_tensors: str | None,
        affine: tuple[torch.Tensor, torch.Tensor] | None = None,
        data_format: ChannelDimension = ChannelDimension.FIRST,
    ) -> BatchFeature:
        # Pad at the bottom and right to the batch maximum, rounded up to the divisor.
        if pad_size is not None:
            pad_size = SizeDict(**dict(pad_size))
            padded_height, padded_width = pad_size.height, pad_size.width
        else:
            padded_height = max(image.shape[-2] for image in images)
            padded_width = max(image.shape[-1] for image in images)
            if size_divisor:
                padded_height = math.ceil(padded_height / size_divisor) * size_divisor
                padded_width = math.ceil(padded_width / size_divisor) * size_divisor
        batch_size, channels = len(images), images[0].shape[0]
        device = images[0].device
        pixel_values = lazily_zeroed((batch_size, channels, padded_height, padded_width), torch.float32, device)
        pixel_mask = lazily_zeroed((batch_size, padded_height, padded_width), torch.int64, device)
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            if height > padded_height or width > padded_width:
                raise ValueError(
                    f"image {index} is {height}x{width}, larger than pad_size {padded_height}x{padded_width}."
                )
            slot = pixel_values[index, :, :height, :width]
            slot.copy_(image)
            if affine is not None:
                # Rescale and normalise in place, in the padded batch: no intermediate copies.
                slot.mul_(affine[0]).add_(affine[1])
            pixel_mask[index, :height, :width] = 1

        if data_format == ChannelDimension.LAST:
            pixel_values = pixel_values.permute(0, 2, 3, 1).contiguous()  # (B, C, H, W) -> (B, H, W, C)
        data: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if maps is not None:
            mask_labels, class_labels = [], []
            for index, segmentation_map in enumerate(maps):
                # Padded target pixels are 0: padding is not part of any object.
                masks, classes = encode_segmentation_map(
                    segmentation_map,
                    per_image(instance_id_to_semantic_id, index, "instance_id_to_semantic_id"),
                    per_image(segments_info, index, "segments_info", nested=True),
                    ignore_index=ignore_index,
                    do_reduce_labels=do_reduce_labels,
                    padded_size=(padded_height, padded_width),
                )
                mask_labels.append(masks)
                class_labels.append(classes)
            data["mask_labels"], data["class_labels"] = mask_labels, class_labels

        if return_tensors in ("pt", "torch"):
            return BatchFeature(data=data)
        if return_tensors not in (None, "np", "numpy"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        converted = {
            key: [item.cpu().numpy() for item in value] if isinstance(value, list) else value.cpu().numpy()
            for key, value in data.items()
        }
        return BatchFeature(data=converted)

    # ----------------------------------------------------------------------------------------------------------------
    # Post-processing (see post_processing.py)
    # ----------------------------------------------------------------------------------------------------------------

    def _geometries(
        self,
        outputs: Any,
        target_sizes: Any,
        pixel_mask: torch.Tensor | None,
        image_sizes: Any,
    ) -> list[post_processing.ImageGeometry]:
        _, mask_logits = post_processing.get_logits(outputs)
        batch_size = mask_logits.shape[0]
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        input_size = None
        if pixel_mask is not None:
            if pixel_mask.ndim != 3 or pixel_mask.shape[0] != batch_size:
                raise ValueError(
                    f"`pixel_mask` must be (B, H, W) with B={batch_size}, got shape {tuple(pixel_mask.shape)}."
                )
            input_size = tuple(pixel_mask.shape[-2:])
            image_sizes = valid_sizes(pixel_mask).tolist()
        elif image_sizes is None and target_sizes is not None:
            if len(target_sizes) != batch_size:
                raise ValueError(
                    f"`target_sizes` has {len(target_sizes)} entries but the outputs hold {batch_size} images."
                )
            # Recompute where each original image lies in the model input: the size preprocessing resized it to.
            image_sizes = [self.resized_size(int(height), int(width)) for height, width in target_sizes]
        return post_processing.resolve_geometry(
            tuple(mask_logits.shape[-2:]), batch_size, target_sizes, image_sizes, input_size
        )

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: list[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
        pixel_mask: torch.Tensor | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Semantic maps: per image a `(height, width)` long tensor of class ids.

        Args:
            outputs: model outputs with `class_queries_logits (B, Q, K+1)` and `masks_queries_logits (B, Q, h, w)`.
            target_sizes: `(height, width)` per image, normally the original image sizes. Without `pixel_mask`
                or `image_sizes`, the valid (unpadded) region of each image is recomputed from its target size
                with this processor's resize settings.
            return_segmentation_scores: also return the `(K, height, width)` class scores (memory heavy).
            pixel_mask: the `pixel_mask (B, H, W)` given to the model; gives the valid regions exactly.
            image_sizes: `(height, width)` per image of the valid region in model-input pixels.
        """
        geometries = self._geometries(outputs, target_sizes, pixel_mask, image_sizes)
        return post_processing.post_process_semantic_segmentation(outputs, geometries, return_segmentation_scores)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: list[tuple[int, int]] | None = None,
        return_coco_annotation: bool | None = False,
        return_binary_maps: bool | None = False,
        pixel_mask: torch.Tensor | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Instances per image: `{"segmentation", "segments_info"}`; see
        `post_processing.post_process_instance_segmentation`. `target_sizes`, `pixel_mask`, `image_sizes` as in
        `post_process_semantic_segmentation`.
        """
        geometries = self._geometries(outputs, target_sizes, pixel_mask, image_sizes)
        return post_processing.post_process_instance_segmentation(
            outputs,
            geometries,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            return_coco_annotation=bool(return_coco_annotation),
            return_binary_maps=bool(return_binary_maps),
        )

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
        target_sizes: list[tuple[int, int]] | None = None,
        return_binary_maps: bool = False,
        pixel_mask: torch.Tensor | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Panoptic segments per image: `{"segmentation", "segments_info"}`; see
        `post_processing.post_process_panoptic_segmentation`. `target_sizes`, `pixel_mask`, `image_sizes` as in
        `post_process_semantic_segmentation`.
        """
        geometries = self._geometries(outputs, target_sizes, pixel_mask, image_sizes)
        return post_processing.post_process_panoptic_segmentation(
            outputs,
            geometries,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            label_ids_to_fuse=label_ids_to_fuse,
            return_binary_maps=return_binary_maps,
        )


def _size_dict(size: SizeDict | dict | int | Sequence[int], max_size: int = _DEFAULT_LONGEST_EDGE) -> dict[str, int]:
    """A `size` argument in any of the forms the Hub configs use -> a size dict.

    An int is the shortest edge, a pair is `(height, width)`; a shortest edge without a longest edge gets
    ``max_size`` (transformers 4's `max_size`, 1333 by default).
    """
    if isinstance(size, int):
        size = {"shortest_edge": size}
    elif isinstance(size, (list, tuple)):
        size = {"height": size[0], "width": size[1]}
    else:
        size = dict(size)
    if size.get("shortest_edge") and not size.get("longest_edge"):
        size["longest_edge"] = max_size
    return size


def _num_channels(image_mean: float | Sequence[float], image_std: float | Sequence[float]) -> int:
    """The channels images are normalised with: the length of `image_mean`/`image_std` (3 when both are numbers)."""
    lengths = {len(value) for value in (image_mean, image_std) if isinstance(value, (list, tuple, np.ndarray))}
    if len(lengths) > 1:
        raise ValueError(
            f"image_mean has {len(image_mean)} values but image_std has {len(image_std)}; give one per channel each."
        )
    return lengths.pop() if lengths else 3
