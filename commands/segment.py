"""``mask2former segment``: run a model over images and write, per image, an overlay PNG and the result as JSON.

Per input image ``<stem>`` the output folder receives:

- ``<stem>.overlay.png``: the image with category colours, labels and segment outlines
  (:mod:`mask2former.processing.visualization`);
- ``<stem>.json``: the result, by task:

  - panoptic: ``panoptic_png`` (``<stem>.panoptic.png``, COCO's encoding ``id = R + 256 G + 256² B``, 0 = no segment)
    and ``segments_info`` (``id``, ``label_id``, ``label``, ``score``, ``was_fused``, ``area``, ``bbox``);
  - instance: ``instances``, each with ``label_id``, ``label``, ``score``, ``area``, ``bbox`` and ``segmentation``,
    an uncompressed COCO RLE (``{"size": [H, W], "counts": [...]}``, column-major runs starting with background)
    that ``pycocotools.mask.frPyObjects`` reads; instances may overlap;
  - semantic: ``semantic_png`` (``<stem>.semantic.png``, 16-bit label ids) and ``labels`` (id -> name of those
    present).

Files that cannot be read as images are reported and skipped; the others are still processed. Exit status: 0 when
every image was written, 1 when none was, 2 when some were skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mask2former.families import family_of
from mask2former.processing.image_io import ImageReadError, read_image
from mask2former.processing.tasks import TASKS, post_process
from mask2former.processing.visualization import (
    draw_instance_segmentation,
    draw_panoptic_segmentation,
    draw_semantic_segmentation,
)

HELP = "segment images (files or folders) and write overlay PNGs and JSON results"

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# ---- inputs --------------------------------------------------------------------------------------------------------


def collect_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, not recursive)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path} does not exist; give image files or folders of images.")
    return files


def _unique_stems(files: Sequence[Path]) -> list[str]:
    """Output names: the file stem, suffixed ``-2``, ``-3``, ... when two inputs share one."""
    seen: dict[str, int] = {}
    stems = []
    for file in files:
        count = seen.get(file.stem, 0) + 1
        seen[file.stem] = count
        stems.append(file.stem if count == 1 else f"{file.stem}-{count}")
    return stems


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


# ---- encodings -----------------------------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary mask: run lengths over the column-major pixels, starting with zeros.

    Args:
        mask (`np.ndarray` of shape `(H, W)`): the binary mask.

    Returns:
        `dict`: ``{"size": [H, W], "counts": [int, ...]}``.
    """
    pixels = np.asarray(mask, dtype=bool).flatten(order="F")  # (H, W) -> (H*W,) column-major, as COCO
    # positions where the value changes, plus both ends, give the run lengths
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    boundaries = np.concatenate([[0], changes, [pixels.size]])
    counts = np.diff(boundaries).tolist()
    if pixels.size and pixels[0]:  # the first run counts zeros, so an image starting with ones begins with 0
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`. -> `(H, W)` bool."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1  # runs alternate 0, 1, 0, ...
    pixels = np.repeat(values, rle["counts"])
    return pixels.reshape((height, width), order="F")


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO box ``[x, y, width, height]`` of a binary mask (zeros when empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def panoptic_ids_to_rgb(segment_map: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours of a segment-id map: ``(H, W)`` ids -> ``(H, W, 3)`` uint8, id = R + 256G + 256²B."""
    ids = np.asarray(segment_map, dtype=np.int64).clip(min=0)  # -1 ("no segment") -> 0
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def _label(id2label: dict[int, str], label_id: int) -> str:
    return str(id2label.get(label_id, label_id))


# ---- writing one result --------------------------------------------------------------------------------------------


def _write_panoptic(result: dict[str, Any], image: Image.Image, stem: str, output_dir: Path, id2label) -> None:
    segment_map = result["segmentation"].cpu().numpy()
    segments = []
    for info in result["segments_info"]:
        mask = segment_map == int(info["id"])
        label_id = int(info["label_id"])
        segments.append({
            "id": int(info["id"]),
            "label_id": label_id,
            "label": _label(id2label, label_id),
            "score": round(float(info.get("score", 1.0)), 6),
            "was_fused": bool(info.get("was_fused", False)),
            "area": int(mask.sum()),
            "bbox": _bbox(mask),
        })  # fmt: skip
    Image.fromarray(panoptic_ids_to_rgb(segment_map)).save(output_dir / f"{stem}.panoptic.png")
    draw_panoptic_segmentation(image, segment_map, segments, id2label).save(output_dir / f"{stem}.overlay.png")
    _write_json(output_dir / f"{stem}.json", {"panoptic_png": f"{stem}.panoptic.png", "segments_info": segments})


def _write_instance(result: dict[str, Any], image: Image.Image, stem: str, output_dir: Path, id2label) -> None:
    segmentation = result["segmentation"].cpu().numpy()
    if segmentation.ndim == 3:  # (N, H, W) binary maps (return_binary_maps=True): instances may overlap
        maps = segmentation.astype(bool)
    else:  # (H, W) segment ids -> one binary map per segment
        maps = np.zeros((len(result["segments_info"]), image.height, image.width), dtype=bool)
        for index, info in enumerate(result["segments_info"]):
            maps[index] = segmentation == int(info["id"])
    instances, infos = [], []
    for mask, info in zip(maps, result["segments_info"]):
        label_id = int(info["label_id"])
        score = round(float(info.get("score", 1.0)), 6)
        instances.append({
            "id": int(info["id"]),
            "label_id": label_id,
            "label": _label(id2label, label_id),
            "score": score,
            "area": int(mask.sum()),
            "bbox": _bbox(mask),
            "segmentation": mask_to_rle(mask),
        })  # fmt: skip
        infos.append({"id": int(info["id"]), "label_id": label_id, "score": score})
    draw_instance_segmentation(image, maps, infos, id2label).save(output_dir / f"{stem}.overlay.png")
    _write_json(output_dir / f"{stem}.json", {"instances": instances}, compact=True)  # RLE counts: long lists


def _write_semantic(result: Any, image: Image.Image, stem: str, output_dir: Path, id2label) -> None:
    label_map = result.cpu().numpy().astype(np.int64)
    # 16 bits: room for any number of classes a model is likely to have (ADE20K-full has 847)
    Image.fromarray(label_map.astype(np.uint16)).save(output_dir / f"{stem}.semantic.png")
    draw_semantic_segmentation(image, label_map, id2label, ignore_value=None).save(output_dir / f"{stem}.overlay.png")
    present = {str(int(label_id)): _label(id2label, int(label_id)) for label_id in np.unique(label_map)}
    _write_json(output_dir / f"{stem}.json", {"semantic_png": f"{stem}.semantic.png", "labels": present})


def _write_json(path: Path, content: dict[str, Any], compact: bool = False) -> None:
    text = json.dumps(content, separators=(",", ":")) if compact else json.dumps(content, indent=1)
    path.write_text(text + "\n")


# ---- the command ---------------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> Any:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu.")
    return torch.device(device)


def load_model_and_processor(model_id: str, device: Any, task: str | None = None) -> tuple[Any, Any]:
    """The model and processor of its family from a Hub id or a local folder (the processor's defaults if it has
    none). Raises ``ValueError`` when the family cannot do ``task``."""
    looks_like_path = Path(model_id).is_absolute() or model_id.startswith(".") or model_id.count("/") > 1
    if looks_like_path and not Path(model_id).is_dir():
        raise ValueError(f"--model {model_id}: no such folder; give a model folder or a Hub id (facebook/...).")
    family = family_of(model_id)
    if task is not None and task not in family.tasks:
        raise ValueError(f"--task {task}: a {family.model_type} model does {', '.join(family.tasks)} segmentation.")
    model = family.model_class.from_pretrained(model_id).to(device).eval()
    try:
        processor = family.processor_class.from_pretrained(model_id)
    except OSError:
        name = family.processor_class.__name__
        print(f"note: {model_id} has no preprocessor_config.json; using {name}'s defaults", file=sys.stderr)
        processor = family.processor_class()
    return model, processor


def segment(
    inputs: Sequence[str | Path],
    model_id: str,
    task: str,
    output_dir: str | Path,
    device: str = "auto",
    batch_size: int = 1,
    threshold: float = 0.5,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every image of ``inputs`` and write the results into ``output_dir``.

    Returns:
        `(written, skipped)`: the input files processed, and ``(file, reason)`` for those that were not.
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is not one of {', '.join(TASKS)}.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    files = collect_inputs(inputs)
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))} (extensions: {sorted(IMAGE_EXTENSIONS)}).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch_device = _resolve_device(device)
    model, processor = load_model_and_processor(model_id, torch_device, task)
    id2label = {int(key): value for key, value in model.config.id2label.items()}

    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    progress = tqdm(total=len(files), desc=f"segment ({task})", unit="image")
    for batch in _batches(list(zip(files, _unique_stems(files))), batch_size):
        images, entries = [], []
        for file, stem in batch:
            try:
                images.append(read_image(file))
                entries.append((file, stem))
            except ImageReadError as error:
                skipped.append((file, f"{type(error).__name__}: {error}"))
                tqdm.write(f"skipped {file}: cannot read it as an image ({error})")
                progress.update(1)
        if not images:
            continue
        model_inputs = processor(images=images, return_tensors="pt").to(torch_device)
        with torch.inference_mode():
            outputs = model(pixel_values=model_inputs["pixel_values"], pixel_mask=model_inputs.get("pixel_mask"))
        target_sizes = [(image.height, image.width) for image in images]
        inference = {"threshold": threshold}
        if task == "instance":
            inference["overlap_mask_area_threshold"] = 0.8
        results = post_process(
            processor,
            outputs,
            task,
            target_sizes,
            pixel_mask=model_inputs.get("pixel_mask"),  # each image's exact valid region
            inference=inference,
            instance_format="binary_maps",  # drawn, and written as RLE by _write_instance
        )
        writer = {"panoptic": _write_panoptic, "instance": _write_instance, "semantic": _write_semantic}[task]
        for (file, stem), image, result in zip(entries, images, results):
            writer(result, image, stem, output_dir, id2label)
            written.append(file)
            progress.update(1)
    progress.close()
    return written, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--model", required=True, help="Hub id (facebook/mask2former-...) or local model folder")
    parser.add_argument("--task", required=True, choices=TASKS, help="which segmentation to output")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the overlay PNGs and JSON files")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default: 1)")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum segment score (panoptic, instance)")


def main(args: argparse.Namespace) -> int:
    try:
        written, skipped = segment(
            args.inputs, args.model, args.task, args.output_dir, args.device, args.batch_size, args.threshold
        )
    except (ValueError, OSError) as error:  # bad arguments; a model that cannot be found or loaded
        print(f"error: {error}")
        return 1
    print(f"wrote {len(written)} result(s) to {args.output_dir}")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not readable images:")
        for file, reason in skipped:
            print(f"  {file}: {reason}")
    if not written:
        return 1
    return 2 if skipped else 0
