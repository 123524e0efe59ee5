"""Decoding and validation of untrusted uploads, before anything reaches the queue.

The worker trusts what it dequeues (decoded uint8 pixels, see ``jobqueue.protocol.Job``), so every
check lives here: size limits are applied from the header, before the pixels are decoded (a
decompression bomb never allocates), and the whole image is decoded eagerly so that a truncated
file fails here with a 400 instead of later in a worker.

Decisions, documented for callers:

* Formats: PNG, JPEG (and MPO, the multi-picture JPEG of many phones), WebP, GIF, BMP, TIFF, PPM.
  Anything else is 415. Pillow's other plugins (EPS calls Ghostscript, ...) are not reachable.
  A file that starts like one of these formats but whose header Pillow cannot read (a PNG cut
  after its signature or IHDR, a 0 x 0 PNG) is a broken image of a supported format: 400, not
  415.
* ``probe_image`` reads only the header (size, format) and applies the limits, so the API can
  refuse or price a job before paying for decoding it.
* Animated images (GIF, APNG, WebP, multi-page TIFF, MPO): the first frame is used; the rest are
  ignored. ``DecodedImage.animated`` tells the API, which says so in a response header.
* Alpha is kept: RGBA, LA, palette images with transparency and colour-keyed RGB/L become 4-channel
  RGBA; everything else becomes RGB. Fully opaque alpha is kept too, so the output mode follows
  the input's predictably.
* Grayscale and bilevel become RGB (gray replicated); CMYK is converted with Pillow's plain
  formula (no ICC colour management); 16-bit and 32-bit integer samples are scaled to 8 bits by
  /257 with rounding (Pillow would clip them). Floating-point images are 415.
* EXIF orientation is applied, so the pixels are upright; a malformed EXIF block is ignored
  rather than failing an otherwise good image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow opens MPO (multi-picture JPEG) through its JPEG plugin, so "JPEG" covers it.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

_RGB_MODES = {"RGB", "RGBX", "L", "1", "CMYK", "YCbCr", "HSV", "P"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(Exception):
    """An upload that cannot be used; carries the HTTP status and a machine-readable code."""

    status_code = 400
    code = "invalid_image"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class EmptyImageError(ImageError):
    code = "empty_body"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class UnsupportedImageError(ImageError):
    status_code = 415
    code = "unsupported_image"


class ImageTooLargeError(ImageError):
    status_code = 413
    code = "image_too_large"


@dataclass(frozen=True)
class ImageLimits:
    """Pixel limits for one operation, checked against the header before decoding."""

    max_pixels: int
    max_side: int | None = None
    fit_side: int | None = None
    """Shrink a decoded image whose longer side exceeds this (``/stylize?max_side=``): a style's
    strokes have a fixed size in pixels, so this sets how large they look on the photo."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    width: int
    height: int
    source_format: str

    def fitted(self, limits: ImageLimits) -> tuple[int, int]:
        """The size after ``fit_side`` (the size the worker will get)."""
        width, height = self.width, self.height
        if limits.fit_side is not None and max(width, height) > limits.fit_side:
            scale = limits.fit_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        return width, height


# Leading bytes of the supported formats: a file that starts like one of them is that format,
# broken, when Pillow cannot identify it (400), rather than some other format (415).
_SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("PNG", b"\x89PNG\r\n\x1a\n", 0),
    ("JPEG", b"\xff\xd8\xff", 0),
    ("GIF", b"GIF87a", 0),
    ("GIF", b"GIF89a", 0),
    ("WEBP", b"WEBP", 8),
    ("BMP", b"BM", 0),
    ("TIFF", b"II*\x00", 0),
    ("TIFF", b"MM\x00*", 0),
)


def _looks_like(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] != b"WEBP":
        return None
    for name, magic, offset in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


@dataclass(frozen=True)
class DecodedImage:
    """uint8 pixels, H x W x C row-major (C = 3 or 4), ready for ``jobqueue.protocol.Job``."""

    width: int
    height: int
    channels: int
    pixels: bytes
    source_format: str
    source_mode: str
    animated: bool = False

    def to_pil(self) -> Image.Image:
        return Image.frombytes("RGBA" if self.channels == 4 else "RGB", self.size, self.pixels)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own bomb guard agree with ours (defence in depth for the API process).

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; the warning is made an
    error so ``decode_image`` turns it into a 413 too. Process-wide on purpose: the API process
    decodes untrusted images only.
    """
    Image.MAX_IMAGE_PIXELS = max(max_pixels, 1)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def check_limits(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"image has no pixels ({width}x{height})")
    if limits.max_side is not None and max(width, height) > limits.max_side:
        raise ImageTooLargeError(
            f"image is {width}x{height}; the largest side allowed here is {limits.max_side} px"
        )
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; at most {limits.max_pixels} "
            "are allowed"
        )


def _open(data: bytes) -> Image.Image:
    if not data:
        raise EmptyImageError("the request carried no image (empty body)")
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        kind = _looks_like(data)
        if kind is not None:
            raise CorruptImageError(
                f"the data starts like a {kind} file but its header is missing or invalid "
                "(truncated, or a zero-sized image)"
            ) from exc
        raise UnsupportedImageError(
            "not an image in a supported format (" + ", ".join(SUPPORTED_FORMATS) + ")"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # Pillow's plugins raise many types for a malformed header.
        raise CorruptImageError(f"unreadable image header: {exc}") from exc


def probe_image(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Size and format from the header only, with the limits applied (no pixel decoded)."""
    with _open(data) as img:
        check_limits(img.width, img.height, limits)
        return ImageHeader(img.width, img.height, img.format or "unknown")


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Validate and decode an upload; raises an ``ImageError`` subclass for every bad input."""
    img = _open(data)
    with img:
        source_format = img.format or "unknown"
        check_limits(img.width, img.height, limits)
        animated = bool(getattr(img, "is_animated", False))
        try:
            if animated:
                img.seek(0)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"decompression bomb refused: {exc}") from exc
        except Exception as exc:  # truncated data, bad CRC, broken compressed stream, ...
            raise CorruptImageError(f"image data is truncated or corrupt: {exc}") from exc
        source_mode = img.mode
        try:
            converted = _to_rgb_or_rgba(_apply_orientation(img))
        except ImageError:
            raise
        except Exception as exc:  # a mode/format combination Pillow cannot convert
            raise UnsupportedImageError(f"cannot convert {source_mode!r} pixels: {exc}") from exc
    if limits.fit_side is not None and max(converted.size) > limits.fit_side:
        scale = limits.fit_side / max(converted.size)
        size = (max(1, round(converted.width * scale)), max(1, round(converted.height * scale)))
        converted = converted.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return DecodedImage(
        width=converted.width,
        height=converted.height,
        channels=len(converted.getbands()),
        pixels=converted.tobytes(),
        source_format=source_format,
        source_mode=source_mode,
        animated=animated,
    )


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation rather than refuse the image
        return img


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "F":
        raise UnsupportedImageError("floating-point images are not supported; send 8 or 16 bits")
    if mode in ("RGB", "RGBA"):
        return img if "transparency" not in img.info else img.convert("RGBA")
    if mode in _WIDE_INT_MODES:
        img = _wide_to_8bit(img)
        mode = img.mode
    if mode in _ALPHA_MODES or img.has_transparency_data:
        return img.convert("RGBA")
    if mode in _RGB_MODES:
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"unsupported pixel mode {mode!r}") from exc


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer samples -> 8-bit L, scaled by 1/257 with rounding (Pillow clips).

    A colour key (``transparency``) in the wide range is carried over, scaled the same way.
    """
    transparency = img.info.get("transparency")
    scaled = img.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")
    if isinstance(transparency, int):
        scaled.info["transparency"] = min(255, max(0, round(transparency / 257)))
    return scaled
