"""Super-resolution quality metrics under the SR literature's conventions (PAPER.md).

PSNR and SSIM are computed on the luma channel Y of ITU-R BT.601 as MATLAB's ``rgb2ycbcr``
defines it (``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1], so Y is in
[16, 235] on a 0-255 scale), after cropping a border of ``factor`` pixels, on HR images
modcropped to a multiple of the factor. Y is kept in floating point (not rounded to uint8 as
MATLAB does for uint8 inputs): the difference is below 0.01 dB and the float form is what most
Python evaluation code reports.

SSIM is Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
L = 255, evaluated only where the window fits entirely inside the image ("valid"), averaged.

Bicubic baseline: the LR image is upscaled with PIL's ``BICUBIC`` filter, whose cubic kernel
(a = -0.5) is MATLAB ``imresize``'s, the kernel behind the published bicubic numbers. torch's
``interpolate(mode="bicubic")`` uses a = -0.75 and would give a slightly different baseline.
The LR image itself is never made here: evaluation reuses the training pipeline's degradation
(``training.data``), so models are scored on inputs made the way they were trained.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import correlate1d

ImageLike = Image.Image | np.ndarray | torch.Tensor

# ITU-R BT.601 luma for RGB in [0, 1], output on the 0-255 scale (MATLAB rgb2ycbcr).
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)
_Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def as_rgb01(image: ImageLike) -> np.ndarray:
    """Any of PIL / uint8 HxWx3 / float HxWx3 in [0, 1] / torch (1x)3xHxW -> float64 HxWx3.

    Grayscale inputs (HxW, or PIL "L" such as Set14's bridge) are replicated to three channels,
    which gives exactly the same Y as MATLAB would compute for the gray image converted to RGB.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"expected a single image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW tensor, got shape {tuple(image.shape)}")
        array = tensor.permute(1, 2, 0).numpy().astype(np.float64)
    elif isinstance(image, np.ndarray):
        array = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image
        array = np.asarray(array, dtype=np.float64)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array


def rgb_to_y(image: ImageLike) -> np.ndarray:
    """BT.601 luma on the 0-255 scale (float64, HxW)."""
    return _Y_OFFSET + as_rgb01(image) @ _Y_WEIGHTS


def modcrop(image: Image.Image, factor: int) -> Image.Image:
    """Crop the right/bottom so both sides are multiples of ``factor`` (MATLAB ``modcrop``)."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    width, height = image.size
    return image.crop((0, 0, width - width % factor, height - height % factor))


def shave(array: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels on each side: SR methods are not judged on the image border."""
    if border <= 0:
        return array
    if array.shape[0] <= 2 * border or array.shape[1] <= 2 * border:
        raise ValueError(f"image {array.shape[:2]} too small to crop a border of {border}")
    return array[border:-border, border:-border]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB ``fspecial('gaussian', 11, 1.5)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable Gaussian filtering keeping only fully-inside positions (``filter2 'valid'``)."""
    out = correlate1d(image, window, axis=0, mode="reflect")
    out = correlate1d(out, window, axis=1, mode="reflect")
    r = (len(window) - 1) // 2
    return out[r : image.shape[0] - r, r : image.shape[1] - r]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two single-channel images (Wang et al. 2004, Gaussian window)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two equal HxW arrays, got {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    window = gaussian_window_1d()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x**2
    var_y = _filter_valid(y * y, window) - mu_y**2
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(num / den))


def psnr_y(output: ImageLike, reference: ImageLike, border: int) -> float:
    return psnr(shave(rgb_to_y(output), border), shave(rgb_to_y(reference), border))


def ssim_y(output: ImageLike, reference: ImageLike, border: int) -> float:
    return ssim(shave(rgb_to_y(output), border), shave(rgb_to_y(reference), border))


def _grid_pattern(residual: np.ndarray, period: int) -> np.ndarray:
    """The zero-mean ``period`` x ``period`` tile (per channel, when there are channels) that
    ``residual`` repeats on its grid: its mean at each phase, less their mean. The residual is
    cropped to whole periods; it must start on the LR grid."""
    height, width = (residual.shape[0] // period) * period, (residual.shape[1] // period) * period
    if not height or not width:
        raise ValueError(f"image {residual.shape[:2]} smaller than the period {period}")
    tiles = residual[:height, :width].reshape(
        height // period, period, width // period, period, *residual.shape[2:]
    )
    pattern = tiles.mean(axis=(0, 2))
    return pattern - pattern.mean(axis=(0, 1), keepdims=True)


def grid_levels(output: np.ndarray, reference: np.ndarray, period: int) -> float:
    """RMS, in 8-bit levels, of the part of ``output - reference`` that repeats every
    ``period`` pixels in both directions (the mean residual at each of the period x period
    phases, less their mean).

    Why: a feature-loss SR net can paint a faint checkerboard on the LR pixel grid that the
    loss network does not see (its pooling discards that phase) and PSNR / LPIPS barely
    register. Natural residuals average out over the phases (bicubic and the pixel-loss nets
    measure 0.15-0.45 levels on Set5 / Set14 / BSD100); the 2026-12-04 ``x4`` 1.3-1.8, visible
    on faces.
    The arrays must start on the LR grid (modcropped, shaved by a multiple of ``period``)."""
    if output.shape != reference.shape:
        raise ValueError(f"shape mismatch {output.shape} vs {reference.shape}")
    residual = np.asarray(output, np.float64) - reference
    return float(np.sqrt(np.mean(_grid_pattern(residual, period) ** 2)))


def without_grid(output: np.ndarray, reference: np.ndarray, period: int) -> np.ndarray:
    """``output`` (H x W x C) less its pattern on the LR grid, per channel: what
    :func:`grid_levels` measures, subtracted. A diagnosis, not a filter (it needs the
    reference): how much of a score such as LPIPS the pattern earns."""
    out = np.asarray(output, np.float64).copy()
    pattern = _grid_pattern(out - np.asarray(reference, np.float64), period)
    height, width = (out.shape[0] // period) * period, (out.shape[1] // period) * period
    out[:height, :width] -= np.tile(pattern, (height // period, width // period, 1))
    return out


def sr_scores(output: ImageLike, reference: ImageLike, factor: int) -> dict[str, float]:
    """PSNR, SSIM and the LR-grid pattern (:func:`grid_levels`) on Y with the conventional
    border of ``factor`` pixels."""
    y_out, y_ref = rgb_to_y(output), rgb_to_y(reference)
    if y_out.shape != y_ref.shape:
        raise ValueError(f"output {y_out.shape} and reference {y_ref.shape} differ in size")
    y_out, y_ref = shave(y_out, factor), shave(y_ref, factor)
    return {
        "psnr": psnr(y_out, y_ref),
        "ssim": ssim(y_out, y_ref),
        "grid": grid_levels(y_out, y_ref, factor),
    }


def bicubic_upscale(image: Image.Image, factor: int) -> Image.Image:
    """The bicubic baseline: PIL BICUBIC (MATLAB's a = -0.5 kernel) by an integer factor."""
    width, height = image.size
    return image.resize((width * factor, height * factor), Image.Resampling.BICUBIC)
