"""The small pictures of the history: JPEG thumbnails of previews, and checked ones from browsers."""

from __future__ import annotations

import io
from pathlib import Path


def thumbnail_jpeg(image, size: int = 96) -> bytes:
    """A small JPEG of a preview image [H, W, 3] uint8 (history entries keep these in the browser)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.LANCZOS).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def checked_thumbnail(encoded: str, limit: int = 64_000) -> bytes:
    """A history thumbnail from the browser (base64 JPEG): decoded, bounded, re-encoded (never the
    browser's bytes). ValueError for anything else."""
    import base64

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    data = base64.b64decode(encoded, validate=True)
    if len(data) > limit:
        raise ValueError("thumbnail too large")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width > 256 or image.height > 256:
                raise ValueError("thumbnail too large")
            return thumbnail_jpeg(np.asarray(image.convert("RGB")), size=min(image.width, 96))
    except UnidentifiedImageError as exc:
        raise ValueError("not an image") from exc


def read_image(path: Path):
    """An image file as [H, W, 3] uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


__all__ = ["checked_thumbnail", "read_image", "thumbnail_jpeg"]
