"""Mask2FormerImageProcessor: config compatibility, parity with transformers' processor on pixel values and labels
(COCO sample and generated maps), our deliberate differences, input formats, bad input, model and pipeline use.

Tolerance on pixel_values: transformers resizes uint8 images with PIL, we with torch's antialiased bilinear on
uint8; both round to 8 bits, so values may differ by one 8-bit level: 1 / 255 / std <= 0.0176 after normalisation.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from mask2former import Mask2FormerImageProcessor

ONE_LEVEL = 1 / 255 / 0.224 + 1e-4  # one 8-bit level after normalising with the smallest std


def _coco(root: Path):
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    records = []
    for annotation in panoptic["annotations"]:
        image = Image.open(root / "val2017" / annotation["file_name"].replace(".png", ".jpg")).convert("RGB")
        png = Image.open(root / "annotations" / "panoptic_val2017" / annotation["file_name"]).convert("RGB")
        records.append((image, png, annotation["segments_info"]))
    return records


def _renumbered(png, segments_info):
    """transformers needs small ids: segments 1..N, void and crowd -> 255 (ignored)."""
    array = np.asarray(png, dtype=np.int64)
    ids = array[..., 0] + 256 * array[..., 1] + 256 * 256 * array[..., 2]
    small = np.full(ids.shape, 255, dtype=np.uint8)
    mapping = {}
    for number, info in enumerate(segments_info, start=1):
        if not info.get("iscrowd", 0):
            small[ids == info["id"]] = number
            mapping[number] = info["category_id"]
    return small, mapping


def _blocky_map(height, width, values, generator):
    coarse = torch.randint(0, len(values), (max(2, height // 16), max(2, width // 16)), generator=generator)
    big = torch.nn.functional.interpolate(coarse[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    return torch.tensor(values)[big.long()].numpy().astype(np.uint8)


def _same_masks(ours_masks, ours_classes, their_masks, their_classes, valid, max_boundary_fraction=0.002):
    """Same classes in the same order; masks equal on the valid region up to nearest-resampling differences at
    boundaries (PIL and our index sampling may round a pixel centre differently): at most 0.2 % of the pixels."""
    assert ours_classes.tolist() == list(their_classes.tolist())
    height, width = valid
    mine = ours_masks[:, :height, :width]
    theirs = torch.as_tensor(their_masks)[:, :height, :width]
    mismatch = (mine != theirs).float().mean().item()
    assert mismatch <= max_boundary_fraction, mismatch
    # Our padding is 0 (transformers pads binary targets with ignore_index).
    assert ours_masks[:, height:].abs().sum() == 0 and ours_masks[:, :, width:].abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_hub_style_configs_load_and_round_trip_with_transformers(tmp_path):
    # As the facebook/mask2former-swin-*-coco-* checkpoints carry it (older transformers wrote these keys).
    hub_config = {
        "do_normalize": True,
        "do_resize": True,
        "ignore_index": 255,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "Mask2FormerImageProcessor",
        "num_labels": 133,
        "reduce_labels": False,
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": 384,
        "size_divisor": 32,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub_config))
    processor = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert dict(processor.size) == {"shortest_edge": 384, "longest_edge": 1333}
    assert processor.ignore_index == 255 and processor.num_labels == 133 and processor.do_reduce_labels is False
    assert processor.resized_size(427, 640) == (384, 576)
    ade_config = dict(hub_config, reduce_labels=True, num_labels=150, size={"shortest_edge": 512})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(ade_config))
    assert Mask2FormerImageProcessor.from_pretrained(tmp_path).do_reduce_labels is True

    # What we save loads in transformers and preprocesses the same way.
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    written = json.loads((saved / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "Mask2FormerImageProcessor"
    theirs = Mask2FormerImageProcessorPil.from_pretrained(saved)
    image = np.random.default_rng(0).integers(0, 256, (427, 640, 3), dtype=np.uint8)
    ours_inputs, their_inputs = processor(image, return_tensors="pt"), theirs(image, return_tensors="pt")
    assert ours_inputs["pixel_values"].shape == their_inputs["pixel_values"].shape == (1, 3, 384, 576)


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------------


def test_coco_sample_parity_with_transformers(coco_sample_root):
    records = _coco(coco_sample_root)
    ours = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333}, ignore_index=255)
    theirs = Mask2FormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 1333}, ignore_index=255)
    images = [image for image, _, _ in records]
    # Ours takes the COCO PNGs as they are (ids up to 256^3) with their segments_info.
    ours_inputs = ours(
        images,
        segmentation_maps=[png for _, png, _ in records],
        segments_info=[segments for _, _, segments in records],
        return_tensors="pt",
    )
    renumbered = [_renumbered(png, segments) for _, png, segments in records]
    their_inputs = theirs(
        images,
        segmentation_maps=[small for small, _ in renumbered],
        instance_id_to_semantic_id=[mapping for _, mapping in renumbered],
        return_tensors="pt",
    )
    assert set(ours_inputs.keys()) == {"pixel_values", "pixel_mask", "mask_labels", "class_labels"}
    assert ours_inputs["pixel_values"].shape == their_inputs["pixel_values"].shape
    difference = (ours_inputs["pixel_values"] - their_inputs["pixel_values"]).abs()
    assert difference.max() <= ONE_LEVEL and difference.mean() < 1e-3
    torch.testing.assert_close(ours_inputs["pixel_mask"], their_inputs["pixel_mask"].long())
    for index, (image, _png, segments) in enumerate(records):
        valid = ours.resized_size(image.height, image.width)
        _same_masks(
            ours_inputs["mask_labels"][index],
            ours_inputs["class_labels"][index],
            their_inputs["mask_labels"][index],
            their_inputs["class_labels"][index],
            valid,
        )
        # Crowd segments are not targets (the original Mask2Former's panoptic mapper skips them).
        crowd_classes = [info["category_id"] for info in segments if info.get("iscrowd", 0)]
        assert len(ours_inputs["class_labels"][index]) == sum(1 for info in segments if not info.get("iscrowd", 0))
        assert crowd_classes or index == 0  # the sample holds crowd segments


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_generated_semantic_maps_parity_with_transformers(reduce_labels):
    generator = torch.Generator().manual_seed(0)
    sizes = [(300, 420), (251, 190), (64, 97)]
    images = [np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8) for i, size in enumerate(sizes)]
    maps = [_blocky_map(*size, [0, 3, 7, 149, 255], generator) for size in sizes]
    settings = {"size": {"shortest_edge": 256, "longest_edge": 512}, "ignore_index": 255}
    ours = Mask2FormerImageProcessor(do_reduce_labels=reduce_labels, **settings)
    theirs = Mask2FormerImageProcessorPil(do_reduce_labels=reduce_labels, **settings)
    ours_inputs = ours(images, segmentation_maps=maps, return_tensors="pt")
    their_inputs = theirs(images, segmentation_maps=maps, return_tensors="pt")
    assert (ours_inputs["pixel_values"] - their_inputs["pixel_values"]).abs().max() <= ONE_LEVEL
    for index, size in enumerate(sizes):
        _same_masks(
            ours_inputs["mask_labels"][index],
            ours_inputs["class_labels"][index],
            their_inputs["mask_labels"][index],
            their_inputs["class_labels"][index],
            ours.resized_size(*size),
        )
    present = set(ours_inputs["class_labels"][0].tolist())
    if reduce_labels:  # 0 -> ignored, 3 -> 2, ..., and 255 -> 254 as in transformers
        assert present <= {2, 6, 148, 254} and 0 not in present
    else:  # 255 is ignored, 0 is a class
        assert present <= {0, 3, 7, 149}


def test_generated_instance_maps_parity_with_transformers():
    generator = torch.Generator().manual_seed(1)
    instance_map = _blocky_map(200, 260, [0, 1, 2, 5, 9], generator)
    mapping = {0: 0, 1: 4, 2: 4, 5: 17, 9: 3}
    image = np.random.default_rng(2).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    settings = {"size": {"height": 160, "width": 224}, "ignore_index": 255}
    ours = Mask2FormerImageProcessor(**settings)(
        image, segmentation_maps=instance_map, instance_id_to_semantic_id=mapping, return_tensors="pt"
    )
    theirs = Mask2FormerImageProcessorPil(**settings)(
        image, segmentation_maps=instance_map, instance_id_to_semantic_id=mapping, return_tensors="pt"
    )
    _same_masks(
        ours["mask_labels"][0],
        ours["class_labels"][0],
        theirs["mask_labels"][0],
        theirs["class_labels"][0],
        (160, 224),
    )


# ----------------------------------------------------------------------------------------------------------------
# Our own behaviour
# ----------------------------------------------------------------------------------------------------------------


def test_large_panoptic_ids_and_empty_images():
    processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64}, ignore_index=255)
    ids = np.zeros((50, 70), dtype=np.int64)
    ids[:25] = 16_000_000  # a COCO-style id far beyond 8 bits
    ids[25:, :35] = 70_000
    segments = [
        {"id": 16_000_000, "category_id": 3, "iscrowd": 0},
        {"id": 70_000, "category_id": 5, "iscrowd": 1},
    ]
    empty = np.zeros((40, 40), dtype=np.int64)
    inputs = processor(
        [np.zeros((50, 70, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)],
        segmentation_maps=[ids, empty],
        segments_info=[segments, []],
        return_tensors="pt",
    )
    assert inputs["class_labels"][0].tolist() == [3]  # the crowd segment is not a target
    assert inputs["mask_labels"][0][0, :32].eq(1).all() and inputs["mask_labels"][0][0, 32:].eq(0).all()
    assert inputs["mask_labels"][1].shape == (0, 64, 64) and inputs["class_labels"][1].shape == (0,)


def test_image_formats_agree():
    processor = Mask2FormerImageProcessor(size={"height": 32, "width": 48})
    rgb = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    reference = processor(rgb, return_tensors="pt")["pixel_values"]
    for variant in (
        rgb.transpose(2, 0, 1),  # CHW
        torch.from_numpy(rgb).permute(2, 0, 1),  # tensor
        Image.fromarray(rgb),
        np.concatenate([rgb, np.full((40, 60, 1), 255, np.uint8)], axis=2),  # RGBA
    ):
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], reference)
    gray = rgb[..., 0]
    gray_values = processor(gray, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(gray_values[0, 0] * 0.229 + 0.485, gray_values[0, 1] * 0.224 + 0.456)
    sixteen_bit = torch.from_numpy(rgb.astype(np.int32) * 257).to(torch.uint16)
    torch.testing.assert_close(
        processor(sixteen_bit, return_tensors="pt")["pixel_values"], reference, atol=ONE_LEVEL, rtol=0
    )
    batch = processor([rgb, rgb[:30]], return_tensors="np")
    assert isinstance(batch["pixel_values"], np.ndarray) and batch["pixel_values"].shape == (2, 3, 32, 64)


def test_batch_padding_is_bottom_right_and_a_multiple_of_the_divisor():
    processor = Mask2FormerImageProcessor(do_resize=False)
    images = [np.full((50, 70, 3), 200, np.uint8), np.full((33, 90, 3), 200, np.uint8)]
    inputs = processor(images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 64, 96)
    assert inputs["pixel_mask"][0, :50, :70].all() and inputs["pixel_mask"][0].sum() == 50 * 70
    assert inputs["pixel_mask"][1, :33, :90].all() and inputs["pixel_mask"][1].sum() == 33 * 90
    assert inputs["pixel_values"][0, :, 50:].abs().sum() == 0 and inputs["pixel_values"][0, :, :, 70:].abs().sum() == 0


def test_bad_input_raises_value_errors(tmp_path):
    processor = Mask2FormerImageProcessor(ignore_index=255)
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="segmentation map 0 is"):
        processor(image, segmentation_maps=np.zeros((20, 31), np.int64))
    with pytest.raises(ValueError, match="instance_id_to_semantic_id"):
        processor(image, segmentation_maps=np.ones((20, 30), np.int64), instance_id_to_semantic_id={0: 1})
    with pytest.raises(ValueError, match="segments_info"):
        processor(
            image, segmentation_maps=np.full((20, 30), 7, np.int64), segments_info=[[{"id": 8, "category_id": 1}]]
        )
    with pytest.raises(ValueError, match="2x2"):
        processor(np.zeros((1, 5), np.uint8))
    with pytest.raises(ValueError, match="channel"):
        processor(np.zeros((20, 30, 2), np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        processor(str(broken))
    with pytest.raises(ValueError, match="do_reduce_labels"):
        Mask2FormerImageProcessor(do_reduce_labels=True)(image, segmentation_maps=np.zeros((20, 30), np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Model and pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tiny_config):
    from mask2former import Mask2FormerForUniversalSegmentation

    return Mask2FormerForUniversalSegmentation(tiny_config("swin", num_labels=5)).eval()


def test_model_accepts_the_batch_feature(tiny_model):
    model = tiny_model
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, ignore_index=255)
    images = [np.zeros((40, 60, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)]
    maps = [np.ones((40, 60), np.int64), np.zeros((50, 50), np.int64)]
    inputs = processor(images, segmentation_maps=maps, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert torch.isfinite(outputs.loss)
    results = processor.post_process_panoptic_segmentation(
        outputs, threshold=0.0, target_sizes=[(40, 60), (50, 50)], pixel_mask=inputs["pixel_mask"]
    )
    assert [tuple(result["segmentation"].shape) for result in results] == [(40, 60), (50, 50)]


@pytest.mark.parametrize("subtask", ["panoptic", "instance", "semantic"])
def test_transformers_pipeline_runs_unchanged(subtask, tiny_model):
    from transformers import pipeline

    segmenter = pipeline(
        "image-segmentation",
        model=tiny_model,
        image_processor=Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
    )
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    annotations = segmenter(image, subtask=subtask, threshold=0.0, overlap_mask_area_threshold=0.0)
    assert annotations, "the pipeline returned no segment"
    for annotation in annotations:
        assert annotation["mask"].size == image.size and annotation["label"].startswith("class ")


def test_every_hub_config_of_the_model_zoo_loads():
    folders = sorted((Path(__file__).resolve().parents[2] / "hub_configs").glob("*/preprocessor_config.json"))
    assert folders, "hub_configs/ has no preprocessor configs"
    image = np.zeros((48, 64, 3), np.uint8)
    for config_file in folders:
        processor = Mask2FormerImageProcessor.from_pretrained(config_file.parent)
        expected = json.loads(config_file.read_text())
        assert processor.size_divisor == expected.get("size_divisor", 32)
        height, width = processor.resized_size(48, 64)
        assert processor(image, return_tensors="pt")["pixel_values"].shape[-2:] == (height, width)


def test_encode_inputs_pads_and_encodes_preprocessed_images():
    processor = Mask2FormerImageProcessor(ignore_index=255)
    images = [np.random.default_rng(5).normal(size=(3, 40, 50)).astype(np.float32), np.zeros((3, 64, 20), np.float32)]
    maps = [np.full((40, 50), 4, np.int64), np.full((64, 20), 255, np.int64)]
    maps[0][:10] = 2
    encoded = processor.encode_inputs(images, segmentation_maps=maps, return_tensors="pt")
    assert encoded["pixel_values"].shape == (2, 3, 64, 64)
    torch.testing.assert_close(encoded["pixel_values"][0, :, :40, :50], torch.from_numpy(images[0]))
    assert encoded["class_labels"][0].tolist() == [2, 4] and encoded["class_labels"][1].tolist() == []
    assert encoded["mask_labels"][0][0, :10, :50].all() and encoded["mask_labels"][0][0].sum() == 10 * 50
    assert encoded["mask_labels"][0][:, 40:].sum() == 0
