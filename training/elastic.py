"""Elastic deformation (Simard, Steinkraus, Platt 2003), batched in torch on the training device.

Each image gets its own displacement field: uniform noise in [-1, 1] per pixel and axis, smoothed
by a Gaussian of standard deviation sigma (zero outside the image, kernel cut at 4 sigma, as
scipy.ndimage.gaussian_filter does), scaled by alpha. The image is then resampled bilinearly at
the displaced positions; positions outside the image read 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def displacement_field(noise: torch.Tensor, sigma: float, alpha: float) -> torch.Tensor:
    """Smooth noise [B, 2, H, W] into a field [B, 2, H, W] of (dy, dx) in pixels."""
    b, two, h, w = noise.shape
    kernel = gaussian_kernel(sigma, device=noise.device, dtype=noise.dtype)
    r = (len(kernel) - 1) // 2
    flat = noise.reshape(b * two, 1, h, w)
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(r, 0))  # along y
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, r))  # along x
    return alpha * flat.reshape(b, two, h, w)


def warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Sample images [B, C, H, W] at (y + dy, x + dx), bilinear, 0 outside the image."""
    b, _, h, w = images.shape
    ys = torch.arange(h, dtype=images.dtype, device=images.device).view(1, h, 1)
    xs = torch.arange(w, dtype=images.dtype, device=images.device).view(1, 1, w)
    y = ys + field[:, 0]
    x = xs + field[:, 1]
    # grid_sample wants (x, y) in [-1, 1] with align_corners=True mapping -1 -> 0 and 1 -> size-1.
    grid = torch.stack((2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1), dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # Like scipy's map_coordinates(mode="constant"): no blending with the outside, a position
    # beyond the first or last pixel centre reads 0.
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return out * inside.unsqueeze(1).to(out.dtype)


def affine_field(angles: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The field [B, 2, H, W] of (dy, dx) that reads every output pixel p at c + s R(angle) (p - c)
    + shift, c the image centre: a rotation (radians) and scaling about the centre, then a shift
    (pixels, [B, 2] as (dy, dx))."""
    ys = torch.arange(h, dtype=angles.dtype, device=angles.device).view(1, h, 1) - (h - 1) / 2
    xs = torch.arange(w, dtype=angles.dtype, device=angles.device).view(1, 1, w) - (w - 1) / 2
    cos, sin = (scales * torch.cos(angles)).view(-1, 1, 1), (scales * torch.sin(angles)).view(-1, 1, 1)
    dy = sin * xs + cos * ys - ys + shifts[:, 0].view(-1, 1, 1)
    dx = cos * xs - sin * ys - xs + shifts[:, 1].view(-1, 1, 1)
    return torch.stack((dy, dx), dim=1)


def random_affine_field(b: int, h: int, w: int, affine: tuple[float, float, float],
                        generator: torch.Generator | None, device=None) -> torch.Tensor:
    """A random affine field per image: angle uniform in +-degrees, scale in 1 +- scale, shift in
    +-shift pixels per axis (affine = (degrees, scale, shift))."""
    degrees, scale, shift = affine
    u = torch.rand((b, 4), generator=generator, device=device) * 2 - 1
    return affine_field(u[:, 0] * degrees * torch.pi / 180, 1 + u[:, 1] * scale, u[:, 2:] * shift, h, w)


def elastic_deform(images: torch.Tensor, sigma: float = 4.0, alpha: float = 20.0,
                   generator: torch.Generator | None = None,
                   affine: tuple[float, float, float] | None = None) -> torch.Tensor:
    """A fresh random elastic deformation of every image of the batch; with `affine` (degrees,
    scale, shift) a random rotation, scaling and shift too, in the same resampling. Without it the
    generator draws exactly what it always drew, so earlier runs stay reproducible."""
    b, _, h, w = images.shape
    noise = torch.rand((b, 2, h, w), generator=generator, device=images.device) * 2 - 1
    field = displacement_field(noise, sigma, alpha)
    if affine is not None and any(affine):
        field = field + random_affine_field(b, h, w, affine, generator, images.device)
    return warp(images, field)


def faded_alpha(alpha: float, epoch: int, epochs: int, fade_epochs: int) -> float:
    """The deformation strength of 0-based `epoch`: full until the last `fade_epochs` epochs,
    then falling linearly so that the last epoch trains on nearly undeformed images (it reads
    alpha / fade_epochs). The model underfits the deformed set; the fade lets it fit the digits
    as they are while the learning rate is already low."""
    if fade_epochs <= 0:
        return alpha
    left = epochs - epoch  # epochs still to run, this one included
    return alpha * min(1.0, left / (fade_epochs + 1))
