"""Image reading, decoding and standardisation (Self-Captioning MI Tuning, App. C.2: images over 1536 px on
the longest side or 2 MP in area are downscaled). Stored images are upright (EXIF orientation applied) and
8-bit, so every later reader can decode them with a plain ``convert("RGB")``; image files are read only when
they are regular files within a size cap."""

from __future__ import annotations

import io
import math
import os
import re
import stat

import numpy as np
from PIL import Image, ImageOps

MAX_SIDE = 1536
MAX_PIXELS = 2_000_000
# The most bytes one encoded image may have. A real photo or page scan is a few MB; the cap stops a row
# whose image "path" names /dev/zero, a FIFO or a huge file from exhausting memory. Configurable per run
# (``engine ingest --max-image-mb``, or ENGINE_MAX_IMAGE_MB).
MAX_IMAGE_BYTES = 64 << 20
# Modes whose samples are wider than 8 bits: converting them straight to RGB clips every value above
# 255 to white, so they are rescaled to 8 bits first.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(ValueError):
    """An image that cannot be used; the message says why, for the rejects table."""


def fit_size(width: int, height: int, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The largest size with the same aspect that keeps both limits (unchanged if already within them)."""
    scale = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file, read only if it is a regular file of at most ``max_bytes`` bytes.

    The file is opened without blocking (a FIFO would otherwise wait for a writer) and checked on the open
    descriptor, so a path swapped for a device after a check cannot slip through; at most ``max_bytes + 1``
    bytes are ever read, even from a file that grows while it is read.

    Raises
    ------
    ImageError
        If the path cannot be opened, is not a regular file (a device such as /dev/zero, a FIFO, a folder)
        or is larger than ``max_bytes``.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ImageError(f"image file {str(path)!r} cannot be read ({error.strerror or type(error).__name__})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"image path {str(path)!r} is not a regular file")
        if info.st_size > max_bytes:
            raise ImageError(f"image file {str(path)!r} has {info.st_size} bytes, more than the limit of {max_bytes}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(descriptor, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as error:
        raise ImageError(f"image file {str(path)!r} cannot be read ({error.strerror or type(error).__name__})") from None
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageError(f"image file {str(path)!r} has more than the limit of {max_bytes} bytes")
    return data


def to_8bit(image: Image.Image) -> Image.Image:
    """The image with 8-bit samples: 16-bit and 32-bit integer greyscale is rescaled from its bit depth
    (65535 -> 255), float greyscale from [0, 1]; values outside those ranges are stretched min-max. Other
    modes are returned unchanged."""
    if image.mode not in WIDE_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        top = 1.0
    elif low >= 0 and high <= 255:
        top = 255.0
    elif low >= 0 and high <= 65535:  # 16-bit data that a decoder widened to 32-bit "I"
        top = 65535.0
    else:  # no known range: stretch what is there
        values, top = values - low, max(high - low, 1e-12)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); a broken EXIF block counts as upright rather than
    rejecting a picture for its metadata."""
    try:
        orientation = int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # PIL raises many types for a malformed EXIF block
        return 1
    return orientation if 1 <= orientation <= 8 else 1  # values outside the standard's 1..8 mean nothing


def standardize(data: bytes | None, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, int, int]:
    """Decode an encoded image fully, turn it upright (EXIF orientation), bring wide samples (16-bit
    greyscale) to 8 bits, and downscale it if it breaks the size limits.

    Returns
    -------
    The bytes to store (the original bytes when the image was already upright, 8-bit and within the
    limits), width and height as stored.

    Raises
    ------
    ImageError
        If the image is empty, larger than ``max_bytes`` or cannot be decoded.
    """
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image has {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises many types for broken files
        detail = re.sub(r" <[^>]*>", "", str(error))  # drop object reprs: reasons must not vary between runs
        raise ImageError(f"image cannot be decoded ({type(error).__name__}: {detail})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError("image has zero size")
    orientation = _orientation(image)
    if orientation in (5, 6, 7, 8):  # a quarter turn: the stored picture is height x width
        width, height = height, width
    new_size = fit_size(width, height)
    if new_size == (width, height) and orientation == 1 and image.mode not in WIDE_MODES:
        return data, width, height
    keeps_alpha = image.mode in ("RGBA", "LA", "P") or image.format == "PNG"
    if orientation != 1:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as error:  # a tag exif_transpose cannot apply: the picture is unusable as stored
            raise ImageError(f"image orientation cannot be applied ({type(error).__name__})") from None
    image = to_8bit(image)
    image = image.convert("RGBA" if keeps_alpha and image.mode != "RGB" else "RGB")
    if new_size != image.size:
        image = image.resize(new_size, Image.LANCZOS)
    out = io.BytesIO()
    if keeps_alpha:
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=95)
    return out.getvalue(), new_size[0], new_size[1]


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (deterministic for the same pixels)."""
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
