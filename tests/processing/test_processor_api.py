"""The processor's image inputs and outputs as transformers' Mask2Former processor has them: channel layouts
(`input_data_format`, `data_format`, transformers' channel inference), N-channel images, bit depths, and output
objects with attribute and key access. Where we differ on purpose, the test says so.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from mask2former import Mask2FormerImageProcessor


def _image(*shape, seed=0, high=256, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _pixels(processor, image, **kwargs):
    return processor(image, return_tensors="pt", **kwargs)["pixel_values"]


def _both(image, **kwargs):
    """Our and transformers' pixel_values, no resizing (64-pixel sides need no padding in either)."""
    ours = Mask2FormerImageProcessor(do_resize=False)
    reference = Mask2FormerImageProcessorPil(do_resize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _pixels(ours, image, **kwargs), _pixels(reference, image, **kwargs)


def test_input_data_format_reads_an_explicit_channels_last_array():
    # (3, 64, 3) could be either layout; said to be channels-last it is a 3x64 RGB image.
    image = _image(32, 64, 3)[:3]  # (3, 64, 3)
    ours, reference = _both(image, input_data_format="channels_last")
    assert ours.shape[1] == 3 and ours.shape[2] == 32  # 3 rows padded to 32, 64 columns
    torch.testing.assert_close(ours[:, :, :3], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        _pixels(Mask2FormerImageProcessor(do_resize=False), image.transpose(2, 0, 1))[:, :, :3], reference
    )


@pytest.mark.parametrize("shape", [(3, 64, 3), (4, 64, 3)])
def test_ambiguous_channel_axis_is_read_as_transformers_reads_it_and_warned(shape):
    # HWC images 3 or 4 rows high: transformers reads them channels-first (warning); so do we, not silently.
    image = _image(*shape)
    reference = Mask2FormerImageProcessorPil(do_resize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_channels = _pixels(reference, image, image_mean=[0.5] * shape[0], image_std=[0.5] * shape[0]).shape[1]
    with pytest.warns(UserWarning, match="input_data_format='channels_last'"):
        ours = _pixels(
            Mask2FormerImageProcessor(do_resize=False), image, image_mean=[0.5] * shape[0], image_std=[0.5] * shape[0]
        )
    assert ours.shape[1] == expected_channels == shape[0]
    explicit = _pixels(Mask2FormerImageProcessor(do_resize=False), image, input_data_format="channels_last")
    assert explicit.shape[1] == 3 and explicit.shape[-1] == 64


def test_bad_input_data_format_is_refused():
    with pytest.raises(ValueError, match="input_data_format must be 'channels_first' or 'channels_last'"):
        Mask2FormerImageProcessor()(_image(64, 64, 3), input_data_format="hwc")
    with pytest.raises(ValueError, match="data_format must be"):
        Mask2FormerImageProcessor()(_image(64, 64, 3), data_format="hwc")


def test_data_format_channels_last_gives_hwc_pixel_values():
    # Deliberate difference: transformers 5's Mask2Former processor ignores data_format; we honour it.
    image = _image(64, 96, 3)
    processor = Mask2FormerImageProcessor(do_resize=False)
    first = _pixels(processor, image)
    last = _pixels(processor, image, data_format="channels_last")
    assert last.shape == (1, 64, 96, 3)
    torch.testing.assert_close(last, first.permute(0, 2, 3, 1))


def test_four_channel_images_keep_their_channels_with_a_four_value_mean():
    image = _image(64, 64, 4)
    mean, std = [0.4, 0.5, 0.6, 0.5], [0.2, 0.25, 0.3, 0.5]
    ours, reference = _both(image, image_mean=mean, image_std=std)
    assert ours.shape == (1, 4, 64, 64)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_rgba_becomes_rgb_with_a_three_value_mean():
    # Deliberate difference: transformers raises ("mean must have 4 elements"); we drop the alpha channel.
    image = _image(64, 64, 4)
    with pytest.raises(ValueError, match="4 elements"):
        Mask2FormerImageProcessorPil(do_resize=False)(image, return_tensors="pt")
    processor = Mask2FormerImageProcessor(do_resize=False)
    torch.testing.assert_close(_pixels(processor, image), _pixels(processor, image[..., :3]))
    torch.testing.assert_close(_pixels(processor, Image.fromarray(image, "RGBA")), _pixels(processor, image[..., :3]))


def test_two_channel_images_with_a_two_value_mean():
    image = _image(64, 64, 2)
    mean, std = [0.3, 0.6], [0.2, 0.4]
    ours, reference = _both(image, image_mean=mean, image_std=std, input_data_format="channels_last")
    assert ours.shape == (1, 2, 64, 64)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # With a two-value mean, two channels are recognised without input_data_format.
    inferred = _pixels(Mask2FormerImageProcessor(do_resize=False), image, image_mean=mean, image_std=std)
    torch.testing.assert_close(inferred, ours)


def test_gray_images_keep_one_channel_with_a_one_value_mean_and_become_rgb_otherwise():
    gray = _image(64, 64)
    processor = Mask2FormerImageProcessor(do_resize=False)
    one = _pixels(processor, gray, image_mean=[0.5], image_std=[0.25])
    assert one.shape == (1, 1, 64, 64)
    torch.testing.assert_close(one[0, 0], (torch.from_numpy(gray).float() / 255 - 0.5) / 0.25)
    rgb = _pixels(processor, gray, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    torch.testing.assert_close(rgb, one.expand(1, 3, 64, 64))
    # A gray + alpha PIL image is gray too.
    gray_alpha = Image.fromarray(np.stack([gray, _image(64, 64, seed=1)], -1), "LA")
    torch.testing.assert_close(_pixels(processor, gray_alpha), _pixels(processor, gray))


def test_channel_count_that_fits_no_rule_is_a_clear_error():
    processor = Mask2FormerImageProcessor(do_resize=False)
    with pytest.raises(ValueError, match=r"\(5, 64, 64\).*5 channels but image_mean and image_std have 3 values"):
        processor(_image(64, 64, 5), input_data_format="channels_last")
    with pytest.raises(ValueError, match="has 2 channels but image_mean and image_std have 3 values"):
        processor(_image(2, 64, 64), input_data_format="channels_first")
    with pytest.raises(ValueError, match="image_mean has 4 values but image_std has 3"):
        processor(_image(64, 64, 4), image_mean=[0.5] * 4, image_std=[0.5] * 3)
    with pytest.raises(ValueError, match="cannot tell the channel axis of an image of shape \\(64, 64, 5\\)"):
        processor(_image(64, 64, 5))


@pytest.mark.parametrize("kind", ["uint16", "PIL I;16", "PIL I", "int32", "float32", "torch float"])
def test_16_bit_images_are_scaled_to_the_8_bit_range(kind):
    # The same picture at 8 and 16 bits gives the same pixel values (16-bit = 8-bit x 257 exactly).
    eight = _image(64, 64, seed=3)
    sixteen = eight.astype(np.uint16) * 257
    image = {
        "uint16": lambda: sixteen,
        "PIL I;16": lambda: Image.fromarray(sixteen),
        "PIL I": lambda: Image.fromarray(sixteen.astype(np.int32)),
        "int32": lambda: sixteen.astype(np.int32),
        "float32": lambda: sixteen.astype(np.float32),
        "torch float": lambda: torch.from_numpy(sixteen.astype(np.float32)),
    }[kind]()
    if kind.startswith("PIL"):
        assert image.mode == kind.split()[1]
    processor = Mask2FormerImageProcessor(do_resize=False)
    torch.testing.assert_close(_pixels(processor, image), _pixels(processor, eight), atol=1e-5, rtol=0)


def test_pixels_beyond_16_bits_are_refused():
    with pytest.raises(ValueError, match="more than 16 bits"):
        Mask2FormerImageProcessor()(_image(64, 64, 3).astype(np.float32) * 1000)


def test_semantic_scores_come_back_as_transformers_output_objects():
    # transformers returns SemanticSegmentationPostProcessorOutput (attribute and key access) with scores.
    generator = torch.Generator().manual_seed(0)
    outputs = type("Outputs", (), {})()
    outputs.class_queries_logits = torch.randn(2, 5, 4, generator=generator)
    outputs.masks_queries_logits = torch.randn(2, 5, 16, 16, generator=generator)
    for processor in (Mask2FormerImageProcessor(), Mask2FormerImageProcessorPil()):
        results = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(40, 40)] * 2, return_segmentation_scores=True
        )
        for result in results:
            assert isinstance(result, SemanticSegmentationPostProcessorOutput)
            assert result.segmentation is result["segmentation"] and result.segmentation.shape == (40, 40)
            assert result.segmentation_scores.shape == (3, 40, 40)
