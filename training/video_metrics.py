"""YouTube-VIS video AP: COCO's AP machinery (pycocotools' ``COCOeval``) with the IoU of mask *tubes*.

Each video is one COCOeval "image", each instance tube one annotation. The IoU of a predicted tube ``d`` and a ground
truth tube ``g`` is taken over the whole clip,

    IoU(d, g) = sum_t |d_t & g_t| / sum_t |d_t | g_t|

(a frame where only one of them is present adds its area to the union), as in the YouTube-VIS evaluation
(``ytvoseval``). Everything else is COCOeval's: the greedy matching by score, the 10 IoU thresholds .50:.95, the
101-point precision, maxDets 1 / 10 / 100, the crowd rule. Areas are a tube's mean area over the frames it is
present in, with YouTube-VIS's ranges small < 128^2 <= medium < 256^2 <= large (not COCO's 32^2 / 96^2). On one-frame
videos the IoU is COCO's mask IoU, so AP, AP50, AP75, AR1 and AR10 equal COCO mask AP (tested against pycocotools).

Formats (YouTube-VIS json, as the 2019 / 2021 / OVIS releases write it):

- ground truth: ``{"videos": [{"id", "height", "width", "length", "file_names"}], "categories": [{"id", "name"}],
  "annotations": [{"id", "video_id", "category_id", "iscrowd", "segmentations": [per frame: RLE (compressed or
  uncompressed counts) | polygons | null], "areas": [...]}]}``;
- results: ``[{"video_id", "category_id", "score", "segmentations": [per frame: compressed RLE | null]}]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..utils.optional import require
from .data.youtube_vis import frame_rle

# YouTube-VIS area ranges (ytvoseval): all, small < 128^2, medium < 256^2, large
AREA_RANGES = [[0.0, 1e10], [0.0, 128.0**2], [128.0**2, 256.0**2], [256.0**2, 1e10]]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")


def _mask_utils() -> Any:
    return require("pycocotools.mask", "video AP")


def tube_areas(rles: Sequence[dict[str, Any] | None]) -> list[float]:
    """Per frame: the mask area (0 where the tube is absent)."""
    mask_utils = _mask_utils()
    return [float(mask_utils.area(rle)) if rle is not None else 0.0 for rle in rles]


def mean_present_area(areas: Sequence[float]) -> float:
    """A tube's area for the area ranges: its mean over the frames where it is present (0 if it never is)."""
    present = [area for area in areas if area > 0]
    return float(np.mean(present)) if present else 0.0


def tube_ious(
    detections: Sequence[Sequence[dict | None]], ground_truth: Sequence[Sequence[dict | None]], iscrowd: Sequence[int]
) -> np.ndarray:
    """`(D, G)` spatio-temporal IoUs of detection tubes against ground-truth tubes (lists of per-frame RLEs).

    For a crowd ground truth the denominator is the detection's area only (COCO's crowd rule).
    """
    mask_utils = _mask_utils()
    num_detections, num_truths = len(detections), len(ground_truth)
    if num_detections == 0 or num_truths == 0:
        return np.zeros((num_detections, num_truths))
    num_frames = len(ground_truth[0])
    for tube in [*detections, *ground_truth]:
        if len(tube) != num_frames:
            raise ValueError(f"tubes of one video must all have {num_frames} frames, got one with {len(tube)}.")
    intersections = np.zeros((num_detections, num_truths))
    detection_areas = np.array([sum(tube_areas(tube)) for tube in detections])
    truth_areas = np.array([sum(tube_areas(tube)) for tube in ground_truth])
    for frame in range(num_frames):
        detection_indices = [i for i, tube in enumerate(detections) if tube[frame] is not None]
        truth_indices = [j for j, tube in enumerate(ground_truth) if tube[frame] is not None]
        if not detection_indices or not truth_indices:
            continue
        detection_rles = [detections[i][frame] for i in detection_indices]
        truth_rles = [ground_truth[j][frame] for j in truth_indices]
        # pycocotools gives I / U per pair; with both areas known, I = IoU (a_d + a_g) / (1 + IoU), an integer
        ious = np.asarray(mask_utils.iou(detection_rles, truth_rles, [0] * len(truth_rles)), dtype=np.float64)
        detection_frame_areas = np.asarray(mask_utils.area(detection_rles), dtype=np.float64)[:, None]
        truth_frame_areas = np.asarray(mask_utils.area(truth_rles), dtype=np.float64)[None, :]
        frame_intersections = np.rint(ious * (detection_frame_areas + truth_frame_areas) / (1 + ious))
        intersections[np.ix_(detection_indices, truth_indices)] += frame_intersections
    unions = detection_areas[:, None] + truth_areas[None, :] - intersections
    crowd = np.asarray(iscrowd, dtype=bool)[None, :]
    denominators = np.where(crowd, detection_areas[:, None], unions)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominators > 0, intersections / denominators, 0.0)


def _load_json(source: str | os.PathLike | dict | list) -> Any:
    if isinstance(source, (dict, list)):
        return source
    with open(source) as handle:
        return json.load(handle)


class VideoInstanceEvaluator:
    """Video AP of predictions against a YouTube-VIS ground-truth json.

    Args:
        ground_truth: a YouTube-VIS json (path or dict) with annotations (the valid/test splits of the releases have
            none: their AP comes from the challenge server).

    Example:

    ```python
    >>> evaluator = VideoInstanceEvaluator("ytvis_2019/train_holdout.json")
    >>> evaluator.add_results(json.load(open("results.json")))  # the YouTube-VIS submission format
    >>> evaluator.compute()  # {"AP": ..., "AP50": ..., "AP75": ..., "APs", "APm", "APl", "AR1", "AR10"}
    ```
    """

    def __init__(self, ground_truth: str | os.PathLike | dict) -> None:
        data = _load_json(ground_truth)
        for key in ("videos", "annotations", "categories"):
            if key not in data:
                raise ValueError(
                    f"the ground truth has no {key!r}: give a YouTube-VIS json with videos, annotations and "
                    "categories (the valid/test jsons of the releases carry no annotations; hold out part of train)."
                )
        self.videos = {video["id"]: video for video in data["videos"]}
        self.categories = data["categories"]
        self.truths: dict[Any, list[dict[str, Any]]] = {video_id: [] for video_id in self.videos}
        for annotation in data["annotations"]:
            video = self.videos.get(annotation["video_id"])
            if video is None:
                raise ValueError(
                    f"annotation {annotation.get('id')} names video {annotation['video_id']}, not listed."
                )
            rles = [frame_rle(s, video["height"], video["width"]) for s in annotation["segmentations"]]
            self.truths[annotation["video_id"]].append(
                {
                    "category_id": annotation["category_id"],
                    "iscrowd": int(annotation.get("iscrowd", 0)),
                    "rles": rles,
                }
            )
        self.detections: list[dict[str, Any]] = []

    def add_results(self, results: Iterable[dict[str, Any]]) -> None:
        """Adds predictions in the submission format (``video_id``, ``category_id``, ``score``, ``segmentations``)."""
        for index, result in enumerate(results):
            video = self.videos.get(result["video_id"])
            if video is None:
                raise ValueError(
                    f"result {index} is for video {result['video_id']!r}, which the ground truth does not list."
                )
            length = len(video.get("file_names") or []) or video.get("length")
            segmentations = result["segmentations"]
            if length is not None and len(segmentations) != length:
                raise ValueError(
                    f"result {index} (video {result['video_id']}) has {len(segmentations)} frame masks but the video "
                    f"has {length} frames; give one RLE (or null) per frame."
                )
            rles = [frame_rle(s, video["height"], video["width"]) for s in segmentations]
            self.detections.append(
                {
                    "video_id": result["video_id"],
                    "category_id": result["category_id"],
                    "score": float(result["score"]),
                    "rles": rles,
                }
            )

    def compute(self) -> dict[str, float]:
        """``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10`` in percent (NaN: undefined)."""
        COCO = require("pycocotools.coco", "video AP").COCO
        COCOeval = require("pycocotools.cocoeval", "video AP").COCOeval
        video_ids = list(self.videos)
        image_of = {video_id: index + 1 for index, video_id in enumerate(video_ids)}
        images = [{"id": image_of[video_id]} for video_id in video_ids]

        def coco_of(tubes: list[dict[str, Any]], with_scores: bool) -> Any:
            annotations = []
            for index, tube in enumerate(tubes):
                annotation = {
                    "id": index + 1,  # COCOeval reads id 0 as "unmatched"
                    "image_id": image_of[tube["video_id"]],
                    "category_id": tube["category_id"],
                    "iscrowd": tube.get("iscrowd", 0),
                    "area": mean_present_area(tube_areas(tube["rles"])),
                    "rles": tube["rles"],
                }
                if with_scores:
                    annotation["score"] = tube["score"]
                annotations.append(annotation)
            coco = COCO()
            coco.dataset = {"images": images, "annotations": annotations, "categories": self.categories}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            return coco

        truths = [{**truth, "video_id": video_id} for video_id, items in self.truths.items() for truth in items]
        coco_truth, coco_detections = coco_of(truths, False), coco_of(self.detections, True)
        # iouType "bbox" only keeps COCOeval's preparation from converting segmentations: the IoU is computeIoU's
        evaluation = COCOeval(coco_truth, coco_detections, iouType="bbox")
        evaluation.params.areaRng = AREA_RANGES
        evaluation.computeIoU = lambda image_id, category_id: _video_ious(evaluation, image_id, category_id)
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = evaluation.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
        values = [*stats[:6], stats[6], stats[7]]
        # COCOeval reports -1 where nothing defines a metric (no ground truth in a size range): NaN, not a score
        return {name: float("nan") if value < 0 else float(value) * 100 for name, value in zip(METRICS, values)}


def _video_ious(evaluation: Any, image_id: int, category_id: int) -> np.ndarray | list:
    """COCOeval.computeIoU with tube IoUs: the same selection and ordering of detections, another overlap."""
    params = evaluation.params
    truths = evaluation._gts[image_id, category_id]
    detections = evaluation._dts[image_id, category_id]
    if not truths and not detections:
        return []
    order = np.argsort([-detection["score"] for detection in detections], kind="mergesort")
    detections = [detections[index] for index in order][: params.maxDets[-1]]
    return tube_ious(
        [detection["rles"] for detection in detections],
        [truth["rles"] for truth in truths],
        [int(truth["iscrowd"]) for truth in truths],
    )


def evaluate_video_results(
    ground_truth: str | os.PathLike | dict, results: str | os.PathLike | list[dict[str, Any]]
) -> dict[str, float]:
    """Video AP of a YouTube-VIS results json (path or list) against a ground-truth json (path or dict)."""
    evaluator = VideoInstanceEvaluator(ground_truth)
    evaluator.add_results(_load_json(results))
    return evaluator.compute()


__all__ = [
    "AREA_RANGES",
    "METRICS",
    "VideoInstanceEvaluator",
    "evaluate_video_results",
    "mean_present_area",
    "tube_areas",
    "tube_ious",
]
