"""Batch clip records into video model inputs through the video processor.

``VideoClipCollator(processor, keep_targets=False, **processor_kwargs)`` is a picklable ``collate_fn``:
``list[VideoClipRecord] -> BatchFeature`` with

- ``pixel_values_videos`` `(B, T, 3, H, W)` float, ``pixel_mask`` `(B, H, W)` long (one per clip)
- ``mask_labels`` list of B `(N_i, T, H, W)` float tubes (``N_i`` may be 0), ``class_labels`` list of B `(N_i,)` long
- ``targets`` (only with ``keep_targets=True``, for evaluation; pop it before ``model(**batch)``): per clip its
  ``video_id``, ``frame_indices`` and original ``(height, width)``.

Every clip of a batch must have the same number of frames (training clips do: ``num_frames`` each).
"""

from __future__ import annotations

from typing import Any

from .data.youtube_vis import VideoClipRecord


class VideoClipCollator:
    """``collate_fn``: clip records -> ``BatchFeature`` via ``processor`` (a ``VideoMask2FormerVideoProcessor``).

    Args:
        processor: the video processor.
        keep_targets: also return per-clip ``targets`` (video id, frame indices, original size).
        processor_kwargs: passed to every processor call (e.g. ``do_resize=False`` after ``ClipResizeShortestEdge``).
    """

    def __init__(self, processor: Any, keep_targets: bool = False, **processor_kwargs: Any) -> None:
        self.processor = processor
        self.keep_targets = keep_targets
        self.processor_kwargs = processor_kwargs

    def __call__(self, records: list[VideoClipRecord]):
        if not records:
            raise ValueError("cannot collate an empty batch of clips")
        batch = self.processor(
            videos=[record["frames"] for record in records],
            instance_masks=[record["masks"] for record in records],
            instance_classes=[record["class_labels"] for record in records],
            return_tensors="pt",
            **self.processor_kwargs,
        )
        if self.keep_targets:
            batch["targets"] = [
                {
                    "video_id": record["video_id"],
                    "frame_indices": list(record["frame_indices"]),
                    "size": tuple(record["frames"][0].shape[:2]),
                }
                for record in records
            ]
        return batch


__all__ = ["VideoClipCollator"]
