"""Panoptic quality: ours (training/evaluate.py) against the COCO panoptic API on the same files, in one process.

Builds a ground truth from ``synthetic-shapes`` (with void regions and crowd segments added) and a prediction with
random edits per segment (kept, removed, relabelled, eroded, dilated, shifted), writes both in the COCO panoptic
format, scores them with ``mask2former.training.evaluate.evaluate_panoptic_files`` and with panopticapi's
single-core ``pq_compute_single_core`` + ``pq_average``, and prints the largest metric difference and the time ratio.

    pip install --no-deps panopticapi-lite   # the COCO panoptic API (numpy + pillow only for evaluation)
    python bench/panoptic_quality.py --num-images 64 --image-size 256

Our timing includes decoding each image (records are complete examples), panopticapi reads only the PNGs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mask2former.training.data import generate_synthetic_shapes, id_to_rgb, rgb_to_id
from mask2former.training.evaluate import evaluate_panoptic_files


def _edit_ground_truth(root: Path, rng: np.random.Generator) -> None:
    """Add void (a segment blanked out) and crowd flags (a thing segment) to the generated ground truth."""
    json_path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(json_path.read_text())
    for annotation in data["annotations"]:
        png_path = root / "annotations" / "panoptic_val2017" / annotation["file_name"]
        ids = rgb_to_id(np.asarray(Image.open(png_path)))
        segments = annotation["segments_info"]
        if len(segments) > 2 and rng.uniform() < 0.4:
            victim = segments.pop(int(rng.integers(len(segments))))
            ids[ids == victim["id"]] = 0
        things = [segment for segment in segments if segment["category_id"] <= 3]
        if things and rng.uniform() < 0.4:
            things[int(rng.integers(len(things)))]["iscrowd"] = 1
        Image.fromarray(id_to_rgb(ids)).save(png_path)
    json_path.write_text(json.dumps(data))


def _predict(root: Path, output: Path, rng: np.random.Generator) -> Path:
    """A prediction: each ground-truth segment kept, removed, relabelled, eroded, dilated or shifted."""
    data = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    category_ids = [category["id"] for category in data["categories"]]
    png_dir = output / "predictions"
    png_dir.mkdir(parents=True)
    annotations = []
    for annotation in data["annotations"]:
        gt = rgb_to_id(np.asarray(Image.open(root / "annotations" / "panoptic_val2017" / annotation["file_name"])))
        prediction = np.zeros_like(gt)
        infos = []
        for new_id, segment in enumerate(annotation["segments_info"], start=1):
            mask = gt == segment["id"]
            action = rng.choice(["keep", "keep", "keep", "remove", "relabel", "erode", "dilate", "shift"])
            category = segment["category_id"]
            if action == "remove":
                continue
            if action == "relabel":
                category = int(rng.choice(category_ids))
            elif action == "erode":
                mask = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 6)))
            elif action == "dilate":
                mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 6)))
            elif action == "shift":
                mask = np.roll(mask, tuple(int(v) for v in rng.integers(-6, 7, size=2)), axis=(0, 1))
            prediction[mask] = new_id  # later segments overwrite earlier ones, as a non-overlapping output must
            infos.append({"id": new_id, "category_id": category})
        present = set(np.unique(prediction).tolist())
        infos = [info for info in infos if info["id"] in present]  # panopticapi refuses listed segments with no pixel
        Image.fromarray(id_to_rgb(prediction)).save(png_dir / annotation["file_name"])
        annotations.append(
            {"image_id": annotation["image_id"], "file_name": annotation["file_name"], "segments_info": infos}
        )
    json_path = output / "predictions.json"
    json_path.write_text(json.dumps({"annotations": annotations, "categories": data["categories"]}))
    return json_path


def _panopticapi(root: Path, predictions: Path) -> dict[str, float]:
    from panopticapi.evaluation import pq_compute_single_core

    gt = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    pred = json.loads(predictions.read_text())
    categories = {category["id"]: category for category in gt["categories"]}
    by_image = {annotation["image_id"]: annotation for annotation in pred["annotations"]}
    matched = [(annotation, by_image[annotation["image_id"]]) for annotation in gt["annotations"]]
    stat = pq_compute_single_core(
        0, matched, str(root / "annotations" / "panoptic_val2017"), str(predictions.with_suffix("")), categories
    )
    results = {}
    for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
        average, _ = stat.pq_average(categories, isthing=isthing)
        for name in ("pq", "sq", "rq"):
            results[f"{name.upper()}{suffix}"] = 100 * average[name]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import datasets  # noqa: F401  (imported before timing: a one-off cost, not evaluation work)

    try:
        import panopticapi.evaluation  # noqa: F401
    except ImportError:
        raise SystemExit("the reference is missing: pip install --no-deps panopticapi-lite") from None

    work = Path(tempfile.mkdtemp(prefix="bench-pq-"))
    try:
        root = generate_synthetic_shapes(
            work, seed=args.seed, num_images=1, num_val_images=args.num_images, image_size=args.image_size
        )
        rng = np.random.default_rng(args.seed)
        _edit_ground_truth(root, rng)
        predictions = _predict(root, work / "prediction", rng)

        start = time.perf_counter()
        ours = evaluate_panoptic_files(root, "val2017", predictions)
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        reference = _panopticapi(root, predictions)
        reference_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    difference = max(abs(ours[key] - reference[key]) for key in reference)
    print(f"images: {args.num_images} ({args.image_size}x{args.image_size}), seed {args.seed}")
    for key in reference:
        print(f"  {key:6s} ours {ours[key]:8.4f}  panopticapi {reference[key]:8.4f}")
    print(f"max |ours - panopticapi| = {difference:.2e} (PQ points)")
    print(
        f"time: ours {ours_seconds:.3f} s, panopticapi {reference_seconds:.3f} s, "
        f"ratio ours/panopticapi = {ours_seconds / reference_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
