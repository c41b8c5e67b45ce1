"""Shrinks one encoded image so that its shorter side is at most max_size (PIL only: prepare.py's worker processes
import just this)."""

import io

from PIL import Image


def shrink_example(example: tuple[bytes, int], *, max_size: int, quality: int = 90) -> tuple[bytes, int]:
  """(encoded, label) -> (encoded, label): the original bytes when the shorter side is <= max_size, else a JPEG
  with the shorter side max_size (antialiased bicubic, the aspect ratio kept to the nearest pixel)."""
  encoded, label = example
  return shrink(encoded, max_size=max_size, quality=quality), label


def shrink(encoded: bytes, *, max_size: int, quality: int = 90) -> bytes:
  with Image.open(io.BytesIO(encoded)) as image:
    w, h = image.size
    if min(w, h) <= max_size:
      return encoded
    scale = max_size / min(w, h)
    size = (max_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), max_size)
    image = image.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
