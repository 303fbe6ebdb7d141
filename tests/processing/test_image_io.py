"""The one image reader: 16-bit scaled, EXIF orientation applied, every error naming the file, used by the processor
(file paths) and by `mask2former segment`, which skips the bad files of a folder one by one."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.processing.image_io import ImageReadError, read_image, read_label_image

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny-swin-coco-panoptic"
ORIENTATION = 0x0112  # the EXIF tag
ROTATED_90_CW = 6  # "the stored picture must be turned 90 degrees clockwise to be upright"


def sixteen_bit_png(path: Path, height: int = 40, width: int = 48) -> np.ndarray:
    """A 16-bit grey PNG whose values span 0..65535; returns the (H, W) uint16 values."""
    values = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return values


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 20 high x 40 wide (left half white) tagged "rotate 90 clockwise"; returns the stored pixels."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Image().getexif()
    exif[ORIENTATION] = ROTATED_90_CW
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return stored


def truncated_jpeg(path: Path) -> None:
    """A JPEG of noise cut after its first kilobyte (header intact: the file opens, decoding fails)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:1024])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = sixteen_bit_png(tmp_path / "deep.png")
    image = np.asarray(read_image(tmp_path / "deep.png")).astype(np.int64)
    assert image.shape == (*values.shape, 3)
    expected = np.round(values / 257.0)  # 65535 -> 255, 0 -> 0
    assert np.abs(image - expected[..., None]).max() <= 1
    # PIL's own conversion clips: most of the image would be white
    assert (np.asarray(Image.open(tmp_path / "deep.png").convert("RGB")) == 255).mean() > 0.9


def test_exif_orientation_is_applied(tmp_path):
    stored = exif_rotated_jpeg(tmp_path / "phone.jpg")
    image = np.asarray(read_image(tmp_path / "phone.jpg")).astype(np.int64)
    upright = np.rot90(stored, k=-1)  # 90 degrees clockwise: (20, 40) -> (40, 20), the white half on top
    assert image.shape == upright.shape == (40, 20, 3)
    assert np.abs(image - upright).mean() < 8  # JPEG noise only


@pytest.mark.parametrize("case", ["truncated", "missing", "not an image", "one pixel", "bomb"])
def test_every_error_names_the_file(tmp_path, case, monkeypatch):
    path = tmp_path / f"{case.replace(' ', '_')}.{'jpg' if case == 'truncated' else 'png'}"
    if case == "truncated":
        truncated_jpeg(path)
    elif case == "not an image":
        path.write_bytes(b"hello")
    elif case == "one pixel":
        Image.new("RGB", (1, 1)).save(path)
    elif case == "bomb":
        Image.new("RGB", (64, 64)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: DecompressionBombError
    with pytest.raises(ImageReadError, match=path.name):
        read_image(path)
    if case == "bomb":
        with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
            read_label_image(path)


def test_label_images_keep_their_values(tmp_path):
    ids = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    Image.fromarray(ids).save(tmp_path / "labels.png")
    assert np.array_equal(np.asarray(read_label_image(tmp_path / "labels.png")), ids)


def test_processor_reads_paths_through_it(tmp_path):
    from mask2former import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor(do_resize=False, do_normalize=False, do_rescale=False, size_divisor=0)
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    from_path = processor(str(tmp_path / "phone.jpg"), return_tensors="pt")["pixel_values"]
    assert from_path.shape[-2:] == (40, 20)  # upright
    values = sixteen_bit_png(tmp_path / "deep.png")
    from_path = processor(str(tmp_path / "deep.png"), return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(from_path, torch.from_numpy(values / 257.0).float().expand(3, -1, -1), atol=0.51)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory, tiny_config) -> Path:
    from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    folder = tmp_path_factory.mktemp("model")
    Mask2FormerForUniversalSegmentation(tiny_config("swin")).save_pretrained(folder)
    Mask2FormerImageProcessor.from_pretrained(TINY).save_pretrained(folder)
    return folder


def test_segment_skips_bad_files_one_by_one_and_reads_16_bit(tmp_path, tiny_model_folder, monkeypatch):
    from mask2former.commands.segment import segment

    folder = tmp_path / "images"
    folder.mkdir()
    values = sixteen_bit_png(folder / "deep.png", 64, 64)
    Image.fromarray(np.round(values / 257.0).astype(np.uint8)).convert("RGB").save(folder / "shallow.png")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    truncated_jpeg(folder / "cut.jpg")
    Image.new("RGB", (96, 96)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4096)  # 96 x 96 = 9216 pixels > 2 x 4096: a "bomb"

    written, skipped = segment([folder], str(tiny_model_folder), "semantic", tmp_path / "out", "cpu", batch_size=5)
    assert sorted(path.name for path in written) == ["deep.png", "shallow.png"]
    reasons = {path.name: reason for path, reason in skipped}
    assert sorted(reasons) == ["cut.jpg", "dot.png", "huge.png"]
    assert all(name in reason for name, reason in reasons.items())
    # the 16-bit PNG is the 8-bit one to the model: the same segmentation
    deep = np.asarray(Image.open(tmp_path / "out" / "deep.semantic.png"))
    shallow = np.asarray(Image.open(tmp_path / "out" / "shallow.semantic.png"))
    assert np.array_equal(deep, shallow)
