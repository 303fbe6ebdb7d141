"""The entry point: a source (local COCO / ADE20K root, ``synthetic-shapes``, Hub id or parquet folder) -> its reader
-> ``SegmentationData`` (a 🤗 dataset of records, its labels, the examples skipped while listing it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...processing.tasks import check_task
from ...utils.optional import require
from .ade20k import ade20k_has_split, ade20k_rows, is_ade_root
from .coco import coco_has_split, coco_instance_annotations, coco_rows, is_coco_root
from .decode import RecordDecoder, Transform, row_features, rows_to_dataset
from .parquet import load_hub_dataset
from .records import SegmentationData, check_on_bad_input
from .synthetic import SYNTHETIC_SOURCE, generate_synthetic_shapes

logger = logging.getLogger(__name__)


def load_dataset_for_segmentation(
    source: str | os.PathLike,
    split: str = "train",
    task: str = "panoptic",
    *,
    transform: Transform | None = None,
    on_bad_input: str = "raise",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_images: int | None = None,
    num_val_images: int | None = None,
    image_size: int | None = None,
    **hub_kwargs: Any,
) -> SegmentationData:
    """Load a segmentation dataset: a 🤗 ``Dataset`` (or ``IterableDataset`` when streaming) of records + its labels.

    Args:
        source: a local COCO root, a local ADE20K root (ADEChallengeData2016), ``"synthetic-shapes"``, or a Hub id /
            local parquet folder (see ``load_hub_dataset`` for ``annotation_format``, ``column_mapping``,
            ``id2label``).
        split: ``"train"``/``"val"`` (COCO accepts ``train2017``/``val2017``; ADE20K ``training``/``validation``).
        task: ``"panoptic"`` (COCO panoptic JSON), ``"instance"`` (COCO instances JSON; for a root with only a
            panoptic JSON, its thing segments) or ``"semantic"`` (any of them: records give the class of each pixel).
        transform: ``record -> record`` applied after decoding (e.g. ``transforms.LargeScaleJitter()``).
        on_bad_input: ``"raise"`` (default: a ``BadExampleError`` naming the file and the id) or ``"skip"``: an
            example found bad while listing is left out and named in ``skipped``; one found bad when decoded comes
            as a placeholder record (``skipped=True``, the reason in ``skip_reasons``) that the collator leaves out
            and reports, also from DataLoader workers.
        streaming: give an ``IterableDataset`` (sharded, so DataLoader workers split it).
        cache_dir, seed, num_images, num_val_images, image_size: for ``synthetic-shapes`` (generated once into
            ``cache_dir``, default ``~/.cache/mask2former``; see ``generate_synthetic_shapes``).
        hub_kwargs: ``load_hub_dataset`` options (``annotation_format``, ``column_mapping``, ``id2label``, ...).

    Returns:
        ``SegmentationData``: ``dataset`` (items are ``SegmentationRecord``s, decoded when read), ``label_info``,
        ``task``, ``skipped`` and ``instance_annotations``.
    """
    check_task(task)
    check_on_bad_input(on_bad_input)
    if str(source) == SYNTHETIC_SOURCE:
        synthetic_options = {"num_images": num_images, "num_val_images": num_val_images, "image_size": image_size}
        options = {key: value for key, value in synthetic_options.items() if value is not None}
        source = generate_synthetic_shapes(cache_dir, seed=seed, **options)
    path = Path(source)
    is_ade, is_coco = path.is_dir() and is_ade_root(path), is_coco_root(path)
    if not (is_ade or is_coco):
        if path.exists() and not any(path.rglob("*.parquet")):
            raise ValueError(
                f"{path} is neither a COCO root (with annotations/), an ADE20K root (with images/training or "
                "images/validation) nor a folder of parquet files"
            )
        hub_options = {"streaming": streaming, "transform": transform, "on_bad_input": on_bad_input, "task": task}
        return load_hub_dataset(str(source), split, **hub_options, **hub_kwargs)
    if hub_kwargs:
        raise ValueError(f"{sorted(hub_kwargs)} only apply to Hub / parquet datasets, not to the local root {path}")
    if is_ade:
        if task != "semantic":
            raise ValueError(f"{path} is an ADE20K (semantic) root; use task='semantic'")
        rows, label_info, skipped = ade20k_rows(path, split, on_bad_input)
        instance_annotations = None
    else:
        rows, label_info, skipped = coco_rows(path, split, task, on_bad_input)
        instance_annotations = coco_instance_annotations(path, split)
    if skipped:
        logger.warning("%d example(s) of %s skipped while listing it", len(skipped), path)
    if not rows:
        raise ValueError(f"no usable examples in {path} (split {split!r})")
    dataset = rows_to_dataset(rows)
    decoder = RecordDecoder(transform, on_bad_input)
    if streaming:
        # several shards so that DataLoader workers can split the stream
        stream = dataset.to_iterable_dataset(num_shards=min(len(dataset), 64))
        dataset = stream.map(decoder, batched=True, batch_size=1, remove_columns=list(row_features()))
    else:
        dataset = dataset.with_transform(decoder)
    return SegmentationData(dataset, label_info, task, skipped, instance_annotations)


def lacks_split(source: str | os.PathLike, split: str) -> bool:
    """True when ``source`` is a local COCO or ADE20K root without ``split`` (e.g. the COCO sample, which has only
    ``val2017``); False for other sources, whose splits are known only once they are loaded."""
    if str(source) == SYNTHETIC_SOURCE:
        return False  # generated with both splits
    path = Path(source)
    if path.is_dir() and is_ade_root(path):
        return not ade20k_has_split(path, split)
    if is_coco_root(path):
        return not coco_has_split(path, split)
    return False


def set_segmentation_transform(dataset, transform: Transform | None):
    """A copy of a map-style dataset from ``load_dataset_for_segmentation`` whose records pass through ``transform``
    (replacing the previous one; decoding is kept). Streaming datasets take ``transform=`` when loaded."""
    datasets = require("datasets", "data loading")
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError("for a streaming dataset pass transform= to load_dataset_for_segmentation")
    current = (dataset.format.get("format_kwargs") or {}).get("transform")
    if not isinstance(current, RecordDecoder):
        raise ValueError(
            "set_segmentation_transform needs the .dataset of what load_dataset_for_segmentation returned"
        )
    return dataset.with_transform(current.with_transform(transform))
