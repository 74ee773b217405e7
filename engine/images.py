"""Image decoding and standardisation (Self-Captioning MI Tuning, App. C.2: images over 1536 px on the
longest side or 2 MP in area are downscaled)."""

from __future__ import annotations

import io
import math
import re

from PIL import Image

MAX_SIDE = 1536
MAX_PIXELS = 2_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message says why, for the rejects table."""


def fit_size(width: int, height: int, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The largest size with the same aspect that keeps both limits (unchanged if already within them)."""
    scale = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def standardize(data: bytes | None) -> tuple[bytes, int, int]:
    """Decode an encoded image fully and downscale it if it breaks the size limits.

    Returns
    -------
    The bytes to store (the original bytes when no resize was needed), width and height.

    Raises
    ------
    ImageError
        If the image is empty or cannot be decoded.
    """
    if not data:
        raise ImageError("image is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises many types for broken files
        detail = re.sub(r" <[^>]*>", "", str(error))  # drop object reprs: reasons must not vary between runs
        raise ImageError(f"image cannot be decoded ({type(error).__name__}: {detail})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError("image has zero size")
    new_size = fit_size(width, height)
    if new_size == (width, height):
        return data, width, height
    keeps_alpha = image.mode in ("RGBA", "LA", "P") or image.format == "PNG"
    image = image.convert("RGBA" if keeps_alpha and image.mode != "RGB" else "RGB").resize(new_size, Image.LANCZOS)
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
