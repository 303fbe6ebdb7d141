"""Where our processor deliberately behaves differently from transformers' Mask2Former processor (README, "Where we
differ from transformers on purpose"): each test runs both on the same input and checks the difference it names.
Post-processing's own differences of substance (no 384x384 intermediate, cropped padding, honoured thresholds, one
entry per fused segment) are checked in test_post_processing.py.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from mask2former import Mask2FormerImageProcessor


@pytest.fixture(scope="module")
def outputs():
    generator = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        class_queries_logits=torch.randn(1, 6, 5, generator=generator) * 3,
        masks_queries_logits=torch.randn(1, 6, 24, 32, generator=generator) * 3,
    )


def _instances(outputs, **kwargs):
    """Our and transformers' instance post-processing of the first image."""
    return tuple(
        processor().post_process_instance_segmentation(outputs, **kwargs)[0]
        for processor in (Mask2FormerImageProcessor, Mask2FormerImageProcessorPil)
    )


def test_without_target_sizes_maps_come_at_the_input_size_not_384x384(outputs):
    # transformers resizes to a fixed 384x384 whatever the input; ours stays at the (valid) input size, 4x the logits.
    ours = Mask2FormerImageProcessor().post_process_semantic_segmentation(outputs)[0]
    theirs = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(outputs)[0]
    assert theirs.shape == (384, 384) and ours.shape == (96, 128)


def test_empty_panoptic_and_instance_maps_are_int32_with_the_usual_void_id(outputs):
    # transformers returns a float map of -1 when no segment is found (void is 0 otherwise) and float instance maps;
    # ours is always int32, void 0 in panoptic and -1 in instance maps.
    ours, theirs = Mask2FormerImageProcessor(), Mask2FormerImageProcessorPil()
    empty = ours.post_process_panoptic_segmentation(outputs, threshold=1.0)[0]["segmentation"]
    reference = theirs.post_process_panoptic_segmentation(outputs, threshold=1.0)[0]["segmentation"]
    assert reference.dtype == torch.float32 and (reference == -1).all()
    assert empty.dtype == torch.int32 and (empty == 0).all()
    instance = ours.post_process_instance_segmentation(outputs, threshold=0.0)[0]["segmentation"]
    assert theirs.post_process_instance_segmentation(outputs, threshold=0.0)[0]["segmentation"].dtype == torch.float32
    assert instance.dtype == torch.int32 and instance.min() >= -1


def test_no_instance_gives_zero_binary_maps_not_a_background_map(outputs):
    # transformers falls back to its (384, 384) map of -1 when return_binary_maps finds nothing; ours is (0, H, W).
    ours, theirs = _instances(outputs, threshold=1.0, return_binary_maps=True)
    assert theirs["segmentation"].shape == (384, 384)
    assert ours["segmentation"].shape == (0, 96, 128) and ours["segmentation"].dtype == torch.bool


def test_coco_annotation_is_one_pycocotools_rle_per_instance(outputs):
    # transformers' return_coco_annotation gives run-length lists of the whole map's ids; ours gives each instance's
    # full mask as a COCO RLE dict (what COCO evaluation reads).
    pytest.importorskip("pycocotools")
    ours, theirs = _instances(outputs, threshold=0.0, return_coco_annotation=True)
    assert isinstance(theirs["segmentation"][0], list)
    assert len(ours["segmentation"]) == len(ours["segments_info"])
    assert all(set(rle) == {"size", "counts"} and rle["size"] == [96, 128] for rle in ours["segmentation"])


def test_padding_is_a_multiple_of_size_divisor_also_without_resizing():
    # transformers pads to the batch maximum when do_resize=False; ours still rounds up to size_divisor (32), which
    # the Swin backbones need.
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    ours = Mask2FormerImageProcessor(do_resize=False)(image, return_tensors="pt")
    theirs = Mask2FormerImageProcessorPil(do_resize=False)(image, return_tensors="pt")
    assert tuple(theirs["pixel_values"].shape[-2:]) == (50, 70)
    assert tuple(ours["pixel_values"].shape[-2:]) == (64, 96)
    assert ours["pixel_mask"][0, :50, :70].all() and ours["pixel_mask"].sum() == 50 * 70


def test_padded_target_pixels_are_zero_not_ignore_index():
    # transformers pads mask_labels with ignore_index; ours with 0 (padding belongs to no object).
    images = [np.zeros((50, 64, 3), dtype=np.uint8), np.zeros((64, 64, 3), dtype=np.uint8)]
    labels = [np.ones((50, 64), dtype=np.uint8), np.ones((64, 64), dtype=np.uint8)]
    ours, theirs = (
        processor(do_resize=False, ignore_index=255)(images, segmentation_maps=labels, return_tensors="pt")
        for processor in (Mask2FormerImageProcessor, Mask2FormerImageProcessorPil)
    )
    assert (theirs["mask_labels"][0][:, 50:] == 255).all()
    assert (ours["mask_labels"][0][:, 50:] == 0).all()
    torch.testing.assert_close(ours["mask_labels"][0][:, :50], theirs["mask_labels"][0][:, :50])


def test_the_processor_has_no_backend_step_methods():
    # transformers' backend exposes its steps (resize, pad, reduce_label, convert_to_rgb, backend); ours does the
    # steps on tensors in preprocess and exposes preprocess / encode_inputs / post_process_* and resized_size.
    reference = Mask2FormerImageProcessorPil()
    for name in ("resize", "pad", "reduce_label", "convert_to_rgb", "backend"):
        assert hasattr(reference, name) and not hasattr(Mask2FormerImageProcessor(), name)
    assert Mask2FormerImageProcessor().resized_size(480, 640) == (800, 1088)
