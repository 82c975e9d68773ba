"""Safe image decoding into the fixed-size uint8 arrays the models work on.

Every decode goes through `decode_image`: EXIF orientation is applied, any
mode (palette, RGBA, CMYK, 16-bit, 1-bit) is converted, the pixel count is
checked *before* decoding (decompression bombs are refused), and the image is
centre-cropped to a square and resized. Errors are `ImageDecodeError` with a
short reason that ends up in the manifest's `error` column.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cfgen.errors import ImageDecodeError

__all__ = ["ImageDecodeError", "decode_image", "decode_png", "encode_image", "encode_png"]


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert('L') clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent images on white rather than on undefined colour.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _square_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def decode_image(source: str | Path | bytes, size: int, channels: int,
                 max_pixels: int = 89_478_485, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to uint8 (size, size, channels); `name` is how errors call the
    file (the manifest's origin, relative to data.root; default: the path)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(f"missing file: {name or path}")
        if not path.is_file():
            raise ImageDecodeError(f"not a file: {name or path}")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image too large: {w}x{h} pixels > {max_pixels} (decompression bomb guard)")
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, channels)
            img = _square_resize(img, size)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"corrupt image: {type(exc).__name__}: {exc}") from None
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def decode_png(data: bytes) -> np.ndarray:
    """A stored image (a pair or shard member: PNG, or a pair's JPEG / WebP) as uint8 (H, W, C) at its own size:
    grey stays one channel."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L") if im.mode in ("L", "I", "I;16", "P", "1") else im.convert("RGB"))
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of a uint8 (H, W, C) array."""
    arr = np.asarray(arr, dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_image(arr: np.ndarray, image_format: str, quality: int) -> bytes:
    """A pair's image as pack.image_format says: 'png' (encode_png, lossless), 'jpeg' or 'webp' at `quality`
    (lossy; deterministic: the same pixels and settings give the same bytes)."""
    if image_format == "png":
        return encode_png(arr)
    arr = np.asarray(arr, dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4, exact=False)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()
