"""Reading image files: the one place where the package opens an image or a label file.

API
---
- ``read_image(source, name=None, what="image") -> PIL.Image.Image``: an 8-bit RGB image, the way a model sees it:
  EXIF orientation applied (photos from phones are stored sideways with an orientation tag), 16-bit pixels scaled
  to 8 bits (``PIL``'s ``convert("RGB")`` clips them, which turns most of a 16-bit PNG white), grey, palette, alpha
  and CMYK images converted to RGB.
- ``read_label_image(source, name=None, what="annotation") -> PIL.Image.Image``: a label file (class or segment ids)
  exactly as stored: no colour conversion and no reorientation, since the values are ids, not colours.
- ``ImageReadError``: raised for anything that cannot be used: a missing, truncated or unidentifiable file, a
  decompression bomb (more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels), an image smaller than 2x2 pixels. The
  message always names the file, so a caller that skips bad files per file (``mask2former segment``, the datasets'
  ``on_bad_input="skip"``) can say which one it skipped and why.

``source`` is a path, the encoded bytes of a file, or an open binary file; ``name`` is what messages call it when
``source`` itself does not say (bytes, file objects).
"""

from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

MIN_IMAGE_SIZE = 2  # the processor's limit: a 1x1 image has no interior to resize or pad from
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ImageSource = str | os.PathLike | bytes | bytearray | IO[bytes]


class ImageReadError(ValueError):
    """A file that cannot be used as an image or a label; the message names the file and the reason."""


def _describe(source: ImageSource, name: str | None, what: str) -> str:
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", f"<{what} bytes>")
    return f"{what} {str(name)!r}"


def _read_error(error: Exception, described: str) -> ImageReadError:
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(
            f"cannot read {described}: {error} (a decompression bomb, or a genuinely huge image: raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
        )
    reason = "no such file" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
    return ImageReadError(f"cannot read {described}: {reason}")


def _open(source: ImageSource, described: str) -> Image.Image:
    """Open and fully decode ``source``, so that a truncated file is found here and not in a later stage."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    opened = None
    try:
        opened = Image.open(handle)
        opened.load()  # a file that PIL opened itself is closed once loaded
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
        if opened is not None:
            opened.close()
        raise _read_error(error, described) from error
    width, height = opened.size
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        raise ImageReadError(
            f"{described} is {width}x{height} pixels; an image must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    return opened


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, scaling 16-bit pixels (0-65535) to 0-255 instead of clipping them."""
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and np.asarray(image).max(initial=0) > 255):
        # (H, W) 16-bit values -> (H, W) 8-bit: 65535 / 257 = 255 exactly
        scaled = np.round(np.asarray(image).astype(np.float32) / 257.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(scaled)  # (H, W) uint8 -> mode "L"
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(source: ImageSource, name: str | None = None, what: str = "image") -> Image.Image:
    """An image file -> 8-bit RGB ``PIL.Image`` with its EXIF orientation applied.

    Args:
        source: a path, the file's bytes, or an open binary file.
        name: what error messages call the file (default: the path, or the file object's ``name``).
        what: the kind of file, for messages (``"image"``, ``"prediction PNG"``).

    Raises:
        ImageReadError: naming the file (missing, truncated, not an image, a decompression bomb, under 2x2 pixels).
    """
    described = _describe(source, name, what)
    image = _open(source, described)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a corrupt EXIF block
        raise ImageReadError(f"cannot read the EXIF orientation of {described}: {error}") from error
    return to_rgb(image)


def read_label_image(source: ImageSource, name: str | None = None, what: str = "annotation") -> Image.Image:
    """A label file (class ids, instance ids, COCO panoptic RGB ids) -> ``PIL.Image`` with its values as stored.

    Raises:
        ImageReadError: naming the file, as ``read_image``.
    """
    return _open(source, _describe(source, name, what))
