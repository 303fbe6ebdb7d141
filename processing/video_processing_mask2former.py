"""Video Mask2Former processor: clips resized and padded consistently, instance tubes encoded, tubes post-processed.

Every frame of a clip goes through the image processor's resize / rescale / normalise (the settings, and the
``preprocessor_config.json`` of an image checkpoint, are those of ``Mask2FormerImageProcessor``); the frames of one
clip share its size, so they are resized alike, and every clip is padded at the bottom and right to the batch
maximum. The output follows transformers' video convention: ``pixel_values_videos`` `(B, T, 3, H, W)` with one
``pixel_mask`` `(B, H, W)` per clip.

Not built on transformers' ``BaseVideoProcessor``: that class needs torchvision, which this package does not depend
on. It takes decoded frames (PIL images, arrays, image paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BatchFeature

from . import video_post_processing
from .image_processing_mask2former import Mask2FormerImageProcessor


def _clip_frames(video: Any, index: int) -> list[Any]:
    """A clip as a list of frames: a list of images, or a `(T, H, W, C)` / `(T, C, H, W)` array or tensor."""
    if isinstance(video, (list, tuple)):
        frames = list(video)
    elif isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:
        frames = list(video)
    else:
        raise ValueError(
            f"videos[{index}] must be a list of frames or a 4-D (T, H, W, C) / (T, C, H, W) array, got "
            f"{type(video).__name__}{' of shape ' + str(tuple(video.shape)) if hasattr(video, 'shape') else ''}."
        )
    if not frames:
        raise ValueError(f"videos[{index}] has no frames.")
    return frames


class VideoMask2FormerVideoProcessor(Mask2FormerImageProcessor):
    r"""Prepares clips (and their instance tubes) for video Mask2Former and turns its outputs into video instances.

    `processor(videos, instance_masks=None, instance_classes=None, return_tensors="pt")` returns a `BatchFeature`:

    - `pixel_values_videos (B, T, 3, H, W)`: every frame resized (one size per clip), rescaled, normalised, and the
      clips padded at the bottom and right to the batch maximum (a multiple of `size_divisor`);
    - `pixel_mask (B, H, W)`: 1 on real pixels, 0 on padding, one per clip;
    - with `instance_masks`, `mask_labels`: per clip `(N_i, T, H, W)` float tubes (nearest-resized, zero in the
      padding) and `class_labels`: per clip `(N_i,)` long.

    So `model(**processor(videos, return_tensors="pt"))` runs [`VideoMask2FormerForVideoSegmentation`]. The settings
    are [`Mask2FormerImageProcessor`]'s (`from_pretrained` reads an image checkpoint's processor config too).
    """

    model_input_names = ["pixel_values_videos", "pixel_mask"]

    def __call__(self, videos: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        instance_masks: Sequence[Any] | None = None,
        instance_classes: Sequence[Any] | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        r"""Preprocesses a clip or a batch of clips of the same length, and optionally their instance tubes.

        Args:
            videos: one clip or a list of clips. A clip is a list of frames (PIL images, `(H, W, C)` arrays, file
                paths...) or a `(T, H, W, C)` / `(T, C, H, W)` array; its frames must share one size.
            instance_masks: per clip, `(N_i, T, H_0, W_0)` binary tubes at the clip's original size (an instance
                absent from a frame has an empty mask there).
            instance_classes: per clip, `(N_i,)` class ids.
            return_tensors: `"pt"` for torch tensors, `"np"` or None for numpy arrays.
            kwargs: the image processor's per-call settings (`size`, `do_resize`, `device`, ...).

        Returns:
            `BatchFeature` with `pixel_values_videos`, `pixel_mask` and, with tubes, `mask_labels`, `class_labels`.
        """
        is_single_clip = isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4
        if is_single_clip or (isinstance(videos, (list, tuple)) and videos and not _is_clip(videos[0])):
            videos = [videos]
        if not isinstance(videos, (list, tuple)) or not videos:
            raise ValueError("videos must be a clip or a non-empty list of clips.")
        clips = [_clip_frames(video, index) for index, video in enumerate(videos)]
        num_frames = len(clips[0])
        for index, clip in enumerate(clips):
            if len(clip) != num_frames:
                raise ValueError(
                    f"videos[{index}] has {len(clip)} frames but videos[0] has {num_frames}; a batch holds clips of "
                    "one length (sample clips of T frames, or process the videos one at a time)."
                )
        if (instance_masks is None) != (instance_classes is None):
            raise ValueError("Pass instance_masks and instance_classes together (both or neither).")

        frames = [frame for clip in clips for frame in clip]
        encoded = super().preprocess(frames, return_tensors="pt", **kwargs)
        pixel_values, frame_masks = encoded["pixel_values"], encoded["pixel_mask"]
        batch_size = len(clips)
        # (B*T, 3, H, W) -> (B, T, 3, H, W); (B*T, H, W) -> (B, T, H, W)
        pixel_values = pixel_values.view(batch_size, num_frames, *pixel_values.shape[1:])
        frame_masks = frame_masks.view(batch_size, num_frames, *frame_masks.shape[1:])
        if not bool((frame_masks == frame_masks[:, :1]).all()):
            raise ValueError(
                "the frames of a clip must share one size (so they are resized and padded alike); got clips whose "
                "frames differ in size."
            )
        data: dict[str, Any] = {"pixel_values_videos": pixel_values, "pixel_mask": frame_masks[:, 0]}
        if instance_masks is not None:
            data["mask_labels"], data["class_labels"] = self._encode_tubes(
                instance_masks, instance_classes, data["pixel_mask"], num_frames
            )
        if return_tensors in ("pt", "torch"):
            return BatchFeature(data=data)
        if return_tensors not in (None, "np", "numpy"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(
            data={
                key: [item.cpu().numpy() for item in value] if isinstance(value, list) else value.cpu().numpy()
                for key, value in data.items()
            }
        )

    def _encode_tubes(
        self,
        instance_masks: Sequence[Any],
        instance_classes: Sequence[Any],
        pixel_mask: torch.Tensor,
        num_frames: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Resizes each clip's tubes to its processed size (nearest, pixel centres) and pads them like the frames."""
        if len(instance_masks) != pixel_mask.shape[0] or len(instance_classes) != pixel_mask.shape[0]:
            raise ValueError(
                f"got {pixel_mask.shape[0]} clips but {len(instance_masks)} instance_masks and "
                f"{len(instance_classes)} instance_classes entries; pass one per clip."
            )
        padded_size = tuple(pixel_mask.shape[-2:])
        mask_labels, class_labels = [], []
        for index, (tubes, classes) in enumerate(zip(instance_masks, instance_classes)):
            tubes = torch.as_tensor(np.asarray(tubes) if not torch.is_tensor(tubes) else tubes)
            classes = torch.as_tensor(np.asarray(classes) if not torch.is_tensor(classes) else classes).long()
            if tubes.ndim != 4 or tubes.shape[1] != num_frames or tubes.shape[0] != classes.numel():
                raise ValueError(
                    f"instance_masks[{index}] must be (N, T, H, W) with T = {num_frames} frames and N = "
                    f"len(instance_classes[{index}]) = {classes.numel()}, got shape {tuple(tubes.shape)}."
                )
            valid_height = int(pixel_mask[index].any(1).sum())
            valid_width = int(pixel_mask[index].any(0).sum())
            # (N, T, H0, W0) -> (N, T, h, w) at the clip's processed size -> zero-padded (N, T, H, W)
            resized = F.interpolate(tubes.float(), size=(valid_height, valid_width), mode="nearest-exact")
            padded = resized.new_zeros(*resized.shape[:2], *padded_size)
            padded[..., :valid_height, :valid_width] = (resized > 0.5).float()
            mask_labels.append(padded.to(pixel_mask.device))
            class_labels.append(classes.to(pixel_mask.device))
        return mask_labels, class_labels

    def post_process_video_instance_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        top_k: int = 10,
        mask_threshold: float = 0.5,
        use_mask_scores: bool = False,
        return_coco_annotation: bool = False,
    ) -> list[dict[str, Any]]:
        """Video instances: the top-k (query, class) pairs per clip with per-frame masks at the original size.

        Args:
            outputs: [`VideoMask2FormerForVideoSegmentation`] outputs (``class_queries_logits`` `(B, Q, K+1)`,
                ``masks_queries_logits`` `(B, Q, T, h, w)`).
            target_sizes: per clip the original `(height, width)` of its frames; default the processed size.
            pixel_mask: the processor's `(B, H, W)` mask; without it the valid region is recomputed from
                ``target_sizes`` with this processor's resize settings.
            top_k: pairs kept per clip (the original keeps 10).
            mask_threshold: probability above which a pixel is in the mask (0.5, i.e. logit 0, as the original).
            use_mask_scores: score = class probability x mean mask probability inside the tube (as the image
                model's instance inference) instead of the class probability alone (the original video inference).
            return_coco_annotation: give each instance's masks as per-frame COCO RLE (needs pycocotools).

        Returns:
            per clip `{"scores": (k,), "labels": (k,), "masks": (k, T, H, W) bool}` (best first), or with
            ``return_coco_annotation`` `"segmentations"`: per instance a list of T RLE dicts instead of ``masks``.
        """
        class_logits, mask_logits = video_post_processing.get_tube_logits(outputs)
        batch_size = mask_logits.shape[0]
        if pixel_mask is not None and (pixel_mask.ndim != 3 or pixel_mask.shape[0] != batch_size):
            raise ValueError(f"`pixel_mask` must be (B, H, W) with B={batch_size}, got {tuple(pixel_mask.shape)}.")
        if pixel_mask is None and target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(
                f"`target_sizes` has {len(target_sizes)} entries but the outputs hold {batch_size} clips."
            )
        # A clip's geometry is its frames' geometry (all frames share one size); the image processor computes it.
        frame_outputs = {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits[:, :, 0]}
        geometries = self._geometries(frame_outputs, target_sizes, pixel_mask, None)
        return video_post_processing.post_process_video_instance_segmentation(
            outputs, geometries, top_k, mask_threshold, use_mask_scores, return_coco_annotation
        )


def _is_clip(item: Any) -> bool:
    """Whether ``item`` is a clip (a list of frames or a 4-D array) rather than a single frame."""
    if isinstance(item, (list, tuple)):
        return True
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4


__all__ = ["VideoMask2FormerVideoProcessor"]
