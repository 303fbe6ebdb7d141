"""mask2former segment: per image an overlay and a JSON that hold exactly what the post-processing returned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
from mask2former.commands import main as cli_main
from mask2former.commands.segment import mask_to_rle, panoptic_ids_to_rgb, rle_to_mask

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny-swin-coco-panoptic"
THRESHOLD = 0.1


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_config) -> Path:
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(tiny_config("swin")).eval()
    with torch.no_grad():  # confident class scores and unlikely "no object": a random model still returns segments
        model.class_predictor.weight.mul_(40.0)
        model.class_predictor.bias[-1] = -20.0
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    Mask2FormerImageProcessor.from_pretrained(TINY).save_pretrained(folder)
    return folder


@pytest.fixture
def images_folder(coco_sample_root, tmp_path) -> Path:
    """The two COCO images at half size, plus a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((coco_sample_root / "val2017").glob("*.jpg")):
        image = Image.open(path)
        image.resize((image.width // 2, image.height // 2)).save(folder / path.name)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def _expected(model_dir: Path, image: Image.Image, task: str):
    """The same image through model + processor directly."""
    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(model_dir)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = {"target_sizes": [(image.height, image.width)], "pixel_mask": inputs["pixel_mask"]}
    if task == "panoptic":
        return processor.post_process_panoptic_segmentation(outputs, threshold=THRESHOLD, **sizes)[0]
    if task == "instance":
        return processor.post_process_instance_segmentation(
            outputs, threshold=THRESHOLD, return_binary_maps=True, **sizes
        )[0]
    return processor.post_process_semantic_segmentation(outputs, **sizes)[0]


def _run(images_folder: Path, model_dir: Path, task: str, output_dir: Path, batch_size: int = 2) -> int:
    return cli_main([
        "segment", str(images_folder), "--model", str(model_dir), "--task", task, "--output-dir", str(output_dir),
        "--device", "cpu", "--batch-size", str(batch_size), "--threshold", str(THRESHOLD),
    ])  # fmt: skip


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_segment_writes_overlay_and_result_per_image_and_skips_unreadable_files(
    task, images_folder, tiny_model_dir, tmp_path, capsys
):
    output_dir = tmp_path / "out"
    status = _run(images_folder, tiny_model_dir, task, output_dir)
    printed = capsys.readouterr()
    assert status == 2  # some written, one skipped
    assert "broken.jpg" in printed.out and "skipped 1 file" in printed.out
    assert not list(output_dir.glob("broken*"))

    image_paths = sorted(images_folder.glob("0*.jpg"))
    for image_path in image_paths:
        image = Image.open(image_path).convert("RGB")
        stem = image_path.stem
        overlay = Image.open(output_dir / f"{stem}.overlay.png")
        assert overlay.size == image.size and overlay.mode == "RGB"
        assert (np.asarray(overlay) != np.asarray(image)).any()
        result = json.loads((output_dir / f"{stem}.json").read_text())
        expected = _expected(tiny_model_dir, image, task)
        if task == "panoptic":
            rgb = np.asarray(Image.open(output_dir / result["panoptic_png"]), dtype=np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
            np.testing.assert_array_equal(ids, expected["segmentation"].clamp(min=0).numpy())
            assert [s["id"] for s in result["segments_info"]] == [s["id"] for s in expected["segments_info"]]
            assert [s["label_id"] for s in result["segments_info"]] == [
                s["label_id"] for s in expected["segments_info"]
            ]
            assert all(s["area"] == int((ids == s["id"]).sum()) for s in result["segments_info"])
            assert result["segments_info"], "the tiny model should find at least one segment"
        elif task == "instance":
            assert len(result["instances"]) == len(expected["segments_info"]) > 0
            for instance, mask, info in zip(result["instances"], expected["segmentation"], expected["segments_info"]):
                np.testing.assert_array_equal(rle_to_mask(instance["segmentation"]), mask.numpy().astype(bool))
                assert instance["label_id"] == info["label_id"]
                assert instance["label"] == Mask2FormerConfig.from_pretrained(TINY).id2label[info["label_id"]]
                assert instance["score"] == pytest.approx(info["score"], abs=1e-5)
        else:
            label_map = np.asarray(Image.open(output_dir / result["semantic_png"])).astype(np.int64)
            np.testing.assert_array_equal(label_map, expected.numpy())
            assert set(map(int, result["labels"])) == set(np.unique(label_map).tolist())


def test_rle_is_cocos_uncompressed_column_major_format():
    mask = np.zeros((3, 4), dtype=bool)
    mask[1:, 1] = True  # column 1, rows 1-2
    mask[0, 3] = True
    rle = mask_to_rle(mask)
    # column-major: col0 = 000, col1 = 011, col2 = 000, col3 = 100 -> runs 0x4, 1x2, 0x3, 1x1, 0x2
    assert rle == {"size": [3, 4], "counts": [4, 2, 3, 1, 2]}
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    starts_with_one = np.ones((2, 2), dtype=bool)
    assert mask_to_rle(starts_with_one)["counts"] == [0, 4]
    pycocotools_mask = pytest.importorskip("pycocotools.mask")
    random_mask = np.random.default_rng(0).random((17, 23)) > 0.6
    decoded = pycocotools_mask.decode(pycocotools_mask.frPyObjects(mask_to_rle(random_mask), 17, 23))
    np.testing.assert_array_equal(decoded.astype(bool), random_mask)


def test_panoptic_png_uses_cocos_id_encoding():
    ids = np.array([[0, 1], [256 + 2, 3 * 256**2 + 5]])
    rgb = panoptic_ids_to_rgb(ids).astype(np.int64)
    np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2], ids)


def test_batch_size_does_not_change_the_results(images_folder, tiny_model_dir, tmp_path):
    assert _run(images_folder, tiny_model_dir, "semantic", tmp_path / "one", batch_size=1) == 2
    assert _run(images_folder, tiny_model_dir, "semantic", tmp_path / "three", batch_size=3) == 2
    for path in sorted((tmp_path / "one").glob("*.semantic.png")):
        np.testing.assert_array_equal(
            np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "three" / path.name))
        )


def test_bad_arguments_are_reported(tmp_path, tiny_model_dir, capsys):
    assert _run(tmp_path / "missing", tiny_model_dir, "semantic", tmp_path / "out") == 1
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert _run(tmp_path / "empty", tiny_model_dir, "semantic", tmp_path / "out") == 1
    assert "no images found" in capsys.readouterr().out
    (tmp_path / "one").mkdir()
    Image.new("RGB", (32, 24)).save(tmp_path / "one" / "a.png")
    assert _run(tmp_path / "one", tmp_path / "no-such-model", "semantic", tmp_path / "out") == 1
    printed = capsys.readouterr().out
    assert "error: --model" in printed and "no-such-model" in printed
