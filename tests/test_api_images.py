"""Upload validation and conversion (service.images): every bad input and every accepted mode."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from service.images import (
    CorruptImageError,
    DecodedImage,
    EmptyImageError,
    ImageLimits,
    ImageTooLargeError,
    UnsupportedImageError,
    configure_pillow,
    decode_image,
)

LIMITS = ImageLimits(max_pixels=4096 * 4096)


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def pixels(decoded: DecodedImage) -> np.ndarray:
    return np.frombuffer(decoded.pixels, np.uint8).reshape(
        decoded.height, decoded.width, decoded.channels
    )


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny file whose header claims ``width x height`` RGB pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --- bad input ---------------------------------------------------------------------------------


def test_empty_body_is_400() -> None:
    with pytest.raises(EmptyImageError) as info:
        decode_image(b"", LIMITS)
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    "data", [b"hello, this is not an image", b"\x00" * 100, b"%PDF-1.7\n%...", b"GIF89"]
)
def test_not_an_image_is_415(data: bytes) -> None:
    with pytest.raises(UnsupportedImageError) as info:
        decode_image(data, LIMITS)
    assert info.value.status_code == 415
    assert "PNG" in info.value.detail  # names the formats that would work


def test_format_outside_the_allow_list_is_415() -> None:
    ico = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO")
    assert Image.open(io.BytesIO(ico)).format == "ICO"  # Pillow itself could read it
    with pytest.raises(UnsupportedImageError):
        decode_image(ico, LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_is_400(fmt: str, keep: float) -> None:
    data = encode(Image.fromarray(noise((48, 48, 3))), fmt, quality=90)
    with pytest.raises((CorruptImageError, UnsupportedImageError)) as info:
        decode_image(data[: int(len(data) * keep)], LIMITS)
    assert info.value.status_code in (400, 415)
    if fmt in ("PNG", "JPEG"):  # the header survives, so it must be reported as corrupt
        assert isinstance(info.value, CorruptImageError)
        assert info.value.status_code == 400


def test_corrupt_png_data_is_400() -> None:
    data = bytearray(encode(Image.fromarray(noise((32, 32, 3)))))
    start = data.index(b"IDAT") + 4
    for offset in range(start + 10, start + 60):
        data[offset] ^= 0xFF
    with pytest.raises(CorruptImageError):
        decode_image(bytes(data), LIMITS)


@pytest.mark.parametrize("side", [8000, 100_000])
def test_header_claiming_huge_size_is_413_before_decoding(side: int) -> None:
    """8000^2 is caught by our limit, 100000^2 already by Pillow's guard: both are 413."""
    bomb = png_header_only(side, side)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(bomb, LIMITS)
    assert info.value.status_code == 413
    if side == 8000:
        assert "8000x8000" in info.value.detail


def test_highly_compressed_bomb_is_413() -> None:
    # 5000 x 4000 black: 20 Mpx (60 MB decoded) from a file of a few tens of KB.
    bomb = encode(Image.new("L", (5000, 4000)), "PNG", optimize=True)
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, LIMITS)


def test_pixel_and_side_limits() -> None:
    data = encode(Image.new("RGB", (40, 30)))
    assert decode_image(data, ImageLimits(max_pixels=1200)).size == (40, 30)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, ImageLimits(max_pixels=1199))
    assert decode_image(data, ImageLimits(max_pixels=10**6, max_side=40)).size == (40, 30)
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, ImageLimits(max_pixels=10**6, max_side=39))
    assert "39" in info.value.detail


def test_pillow_bomb_guard_is_also_a_413(monkeypatch: pytest.MonkeyPatch) -> None:
    """With our own limit set higher, Pillow's guard (set by configure_pillow) still answers 413."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    data = encode(Image.new("RGB", (64, 64)))
    with warnings.catch_warnings():
        configure_pillow(1500)  # 4096 px > 2 x 1500: DecompressionBombError
        with pytest.raises(ImageTooLargeError):
            decode_image(data, ImageLimits(max_pixels=10**6))
        configure_pillow(3000)  # 3000 < 4096 <= 6000: the warning, made an error
        with pytest.raises(ImageTooLargeError):
            decode_image(data, ImageLimits(max_pixels=10**6))


def test_float_images_are_415() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"), "TIFF")
    with pytest.raises(UnsupportedImageError):
        decode_image(data, LIMITS)


# --- accepted and converted --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "PPM"])
def test_lossless_rgb_roundtrip(fmt: str) -> None:
    source = noise((17, 23, 3))
    decoded = decode_image(encode(Image.fromarray(source), fmt), LIMITS)
    assert (decoded.width, decoded.height, decoded.channels) == (23, 17, 3)
    assert len(decoded.pixels) == 17 * 23 * 3
    np.testing.assert_array_equal(pixels(decoded), source)
    assert decoded.source_format == fmt
    assert not decoded.animated


def test_lossy_formats_decode_close_to_source() -> None:
    source = np.zeros((32, 32, 3), np.uint8)
    source[:, :16] = (200, 40, 40)
    source[:, 16:] = (30, 60, 220)
    for fmt in ("JPEG", "WEBP"):
        decoded = decode_image(encode(Image.fromarray(source), fmt, quality=95), LIMITS)
        assert decoded.channels == 3
        err = np.abs(pixels(decoded).astype(int) - source.astype(int))
        assert err[:, 2:14].max() <= 6 and err[:, 18:30].max() <= 6


def test_grayscale_becomes_rgb() -> None:
    gray = noise((9, 11))
    decoded = decode_image(encode(Image.fromarray(gray, "L")), LIMITS)
    assert decoded.channels == 3 and decoded.source_mode == "L"
    for channel in range(3):
        np.testing.assert_array_equal(pixels(decoded)[..., channel], gray)


def test_bilevel_becomes_black_and_white_rgb() -> None:
    bits = noise((8, 16)) > 127
    decoded = decode_image(encode(Image.fromarray(bits).convert("1")), LIMITS)
    assert decoded.channels == 3 and decoded.source_mode == "1"
    np.testing.assert_array_equal(pixels(decoded)[..., 0], np.where(bits, 255, 0))


def test_palette_becomes_rgb_with_the_palette_colours() -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1, 1, 0, 1, 1, 1, 0])
    decoded = decode_image(encode(img), LIMITS)
    assert decoded.channels == 3 and decoded.source_mode == "P"
    assert pixels(decoded)[0, 0].tolist() == [10, 20, 30]
    assert pixels(decoded)[0, 1].tolist() == [200, 100, 50]


def test_palette_with_transparency_becomes_rgba() -> None:
    img = Image.new("P", (4, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1, 0, 1])
    for fmt in ("PNG", "GIF"):
        decoded = decode_image(encode(img, fmt, transparency=0), LIMITS)
        assert decoded.channels == 4, fmt
        assert pixels(decoded)[0, :, 3].tolist() == [0, 255, 0, 255]
        assert pixels(decoded)[0, 1, :3].tolist() == [200, 100, 50]


def test_rgba_keeps_alpha_exactly() -> None:
    source = noise((12, 10, 4), seed=3)
    decoded = decode_image(encode(Image.fromarray(source, "RGBA")), LIMITS)
    assert decoded.channels == 4
    np.testing.assert_array_equal(pixels(decoded), source)
    assert decoded.to_pil().mode == "RGBA"


def test_fully_opaque_alpha_is_still_kept() -> None:
    source = noise((6, 6, 4))
    source[..., 3] = 255
    assert decode_image(encode(Image.fromarray(source, "RGBA")), LIMITS).channels == 4


def test_gray_with_alpha_becomes_rgba() -> None:
    source = noise((5, 7, 2), seed=4)
    decoded = decode_image(encode(Image.fromarray(source, "LA")), LIMITS)
    assert decoded.channels == 4 and decoded.source_mode == "LA"
    out = pixels(decoded)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], source[..., 0])
    np.testing.assert_array_equal(out[..., 3], source[..., 1])


def test_rgb_colour_key_becomes_alpha() -> None:
    img = Image.new("RGB", (3, 1), (1, 2, 3))
    img.putpixel((1, 0), (9, 9, 9))
    decoded = decode_image(encode(img, transparency=(1, 2, 3)), LIMITS)
    assert decoded.channels == 4
    assert pixels(decoded)[0, :, 3].tolist() == [0, 255, 0]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt: str) -> None:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8, :, 0] = 255  # cyan
    cmyk[8:, :, 2] = 255  # yellow
    decoded = decode_image(encode(Image.fromarray(cmyk, "CMYK"), fmt, quality=95), LIMITS)
    assert decoded.channels == 3 and decoded.source_mode == "CMYK"
    out = pixels(decoded).astype(int)
    assert np.abs(out[2:6, 2:14] - [0, 255, 255]).max() <= 8
    assert np.abs(out[10:14, 2:14] - [255, 255, 0]).max() <= 8


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    levels = np.arange(256, dtype=np.uint16) * 257  # exact 8-bit levels in 16 bits
    source = levels.reshape(16, 16)
    source[0, 1] = 65535
    source[0, 2] = 32896  # 128 * 257 + 0: rounds to 128
    img = Image.fromarray(source)
    assert img.mode.startswith("I;16")
    decoded = decode_image(encode(img), LIMITS)
    assert decoded.channels == 3 and decoded.source_mode.startswith("I;16")
    out = pixels(decoded)[..., 0].astype(int)
    expected = np.arange(256).reshape(16, 16)
    expected[0, 1], expected[0, 2] = 255, 128
    np.testing.assert_array_equal(out, expected)


def test_exif_orientation_is_applied() -> None:
    # Stored 24 wide x 12 high: left half red, right half blue. Orientation 6 = "rotate 90 CW
    # to display": upright it is 12 wide x 24 high with red on top.
    stored = np.zeros((12, 24, 3), np.uint8)
    stored[:, :12] = (255, 0, 0)
    stored[:, 12:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    decoded = decode_image(data, LIMITS)
    assert decoded.size == (12, 24)
    out = pixels(decoded).astype(int)
    assert np.abs(out[2:10, 2:10] - [255, 0, 0]).max() <= 8
    assert np.abs(out[14:22, 2:10] - [0, 0, 255]).max() <= 8


def test_exif_orientation_is_checked_against_limits_either_way() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (30, 10)), "JPEG", exif=exif)
    decoded = decode_image(data, ImageLimits(max_pixels=300, max_side=30))
    assert decoded.size == (10, 30)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_uses_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True
    )
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    decoded = decode_image(data, LIMITS)
    assert decoded.animated
    assert decoded.size == (16, 16)
    assert np.abs(pixels(decoded)[..., :3].astype(int) - [255, 0, 0]).max() <= 2


def test_to_pil_matches_pixels() -> None:
    source = noise((5, 4, 3))
    decoded = decode_image(encode(Image.fromarray(source)), LIMITS)
    np.testing.assert_array_equal(np.asarray(decoded.to_pil()), source)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_mutated_files_only_ever_raise_image_errors() -> None:
    """Random corruption of valid files of every accepted format: each either decodes or is
    refused with an ImageError (a 4xx), never any other exception (a 500)."""
    source = noise((20, 16, 4), seed=9)
    rgba = Image.fromarray(source, "RGBA")
    files = [
        encode(rgba, "PNG"),
        encode(rgba.convert("RGB"), "JPEG"),
        encode(rgba.convert("RGB").convert("P"), "GIF"),
        encode(rgba, "TIFF"),
        encode(rgba.convert("RGB"), "BMP"),
        encode(rgba, "WEBP"),
        encode(Image.fromarray(source[..., 0].astype(np.uint16) * 257), "PNG"),
        encode(rgba.convert("CMYK"), "TIFF"),
    ]
    rng = np.random.default_rng(2024)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(400):
        data = bytearray(files[i % len(files)])
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(len(data)))
            if rng.random() < 0.7:
                data[pos] = int(rng.integers(256))
            else:
                del data[pos : pos + int(rng.integers(1, 40))]
        try:
            decoded = decode_image(bytes(data), LIMITS)
        except (CorruptImageError, UnsupportedImageError, ImageTooLargeError):
            outcomes["refused"] += 1
        else:
            assert len(decoded.pixels) == decoded.width * decoded.height * decoded.channels
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes
