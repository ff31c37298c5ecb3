"""The shapes (signed distance in texels, > 0 inside) and procedural textures of the
synthetic scenes (``fmapicon.data.synth``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np



# ---------------------------------------------------------------------------------------
# shapes: signed distance in texels (> 0 inside), for anti-aliased alpha and the mask


@dataclass
class Ellipse:
    a: float
    b: float

    @property
    def radius(self) -> float:
        return max(self.a, self.b)

    def sdf(self, x, y):
        # first-order distance to the level set k = 1 of k = |(x/a, y/b)|: (1 - k) / |grad k|
        k = np.sqrt((x / self.a) ** 2 + (y / self.b) ** 2)
        grad = np.sqrt((x / self.a**2) ** 2 + (y / self.b**2) ** 2) / np.maximum(k, 1e-6)
        return (1.0 - k) / np.maximum(grad, 1e-6)


@dataclass
class ConvexPolygon:
    normals: np.ndarray  # K x 2 outward unit normals
    offsets: np.ndarray  # K, distance of each edge's line from the centre
    radius: float

    def sdf(self, x, y):
        # inside a convex polygon the distance to the boundary is the smallest edge distance
        out = None
        for (nx, ny), d in zip(self.normals, self.offsets):
            edge = d - (nx * x + ny * y)
            out = edge if out is None else np.minimum(out, edge)
        return out


@dataclass
class Radial:
    """A star-shaped outline r(phi): a smooth blob (Fourier radius), a star (piecewise
    linear radius between alternating tips) or, with ``hole`` > 0, a ring."""

    harmonics: np.ndarray  # K x 3: order, amplitude, phase (blob)
    base: float
    star_radii: np.ndarray | None = None  # 2K alternating tip/notch radii (star)
    hole: float = 0.0

    @property
    def radius(self) -> float:
        if self.star_radii is not None:
            return float(self.star_radii.max())
        return self.base * (1.0 + float(np.abs(self.harmonics[:, 1]).sum()))

    def _outline(self, phi):
        """r(phi) and dr/dphi."""
        if self.star_radii is not None:
            count = len(self.star_radii)
            pos = (phi % (2 * np.pi)) / (2 * np.pi) * count
            lo = np.floor(pos).astype(np.int64) % count
            hi = (lo + 1) % count
            frac = pos - np.floor(pos)
            r = self.star_radii[lo] * (1 - frac) + self.star_radii[hi] * frac
            dr = (self.star_radii[hi] - self.star_radii[lo]) * count / (2 * np.pi)
            return r, dr
        r = np.full_like(phi, self.base)
        dr = np.zeros_like(phi)
        for order, amplitude, phase in self.harmonics:
            r = r + self.base * amplitude * np.cos(order * phi + phase)
            dr = dr - self.base * amplitude * order * np.sin(order * phi + phase)
        return r, dr

    def sdf(self, x, y):
        rho = np.sqrt(x * x + y * y)
        r, dr = self._outline(np.arctan2(y, x))
        # distance to r(phi) measured along the normal, first order
        outer = (r - rho) / np.sqrt(1.0 + (dr / np.maximum(r, 1e-6)) ** 2)
        if self.hole <= 0:
            return outer
        return np.minimum(outer, rho - self.hole * r)


def random_shape(rng: np.random.Generator, radius: float):
    """A shape of characteristic radius ``radius`` texels."""
    kind = rng.choice(["ellipse", "polygon", "blob", "star", "ring"], p=[0.28, 0.24, 0.28, 0.12, 0.08])
    if kind == "ellipse":
        aspect = rng.uniform(0.45, 1.0)
        return Ellipse(radius, radius * aspect)
    if kind == "polygon":
        count = int(rng.integers(3, 9))
        # vertices spread round the circle with a jitter, so that no edge is degenerate
        steps = np.arange(count) + rng.uniform(-0.3, 0.3, count)
        angles = np.sort((rng.uniform(0, 2 * np.pi) + steps * 2 * np.pi / count) % (2 * np.pi))
        vertices = np.stack([np.cos(angles), np.sin(angles)], 1) * radius * rng.uniform(0.8, 1.0, (count, 1))
        edges = np.roll(vertices, -1, axis=0) - vertices
        normals = np.stack([edges[:, 1], -edges[:, 0]], 1)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        offsets = (normals * vertices).sum(1)
        flip = offsets < 0  # orient every normal outwards
        normals[flip] *= -1
        offsets[flip] *= -1
        return ConvexPolygon(normals, offsets, float(np.linalg.norm(vertices, axis=1).max()))
    if kind in ("blob", "ring"):
        orders = rng.choice(np.arange(2, 7), size=3, replace=False)
        amplitudes = rng.uniform(0.0, 0.16, 3)
        harmonics = np.stack([orders, amplitudes, rng.uniform(0, 2 * np.pi, 3)], 1)
        hole = rng.uniform(0.3, 0.55) if kind == "ring" else 0.0
        return Radial(harmonics, radius / (1 + amplitudes.sum()), hole=hole)
    tips = int(rng.integers(4, 8))
    radii = np.empty(2 * tips)
    radii[0::2] = radius * rng.uniform(0.85, 1.0, tips)
    radii[1::2] = radius * rng.uniform(0.4, 0.65, tips)
    return Radial(np.zeros((0, 3)), radius, star_radii=radii)


# ---------------------------------------------------------------------------------------
# textures: H x W x 3 float32 in [0, 1]


def _squash(field_: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Standardize a field and map it smoothly into [0, 1]."""
    field_ = (field_ - field_.mean()) / (field_.std() + 1e-6)
    return 0.5 * (1.0 + np.tanh(gain * field_))


def _fractal_noise(rng, shape, beta: float, channels: int = 1) -> np.ndarray:
    """Gaussian noise with a 1/f^beta amplitude spectrum (natural images: beta ~ 1), channels x H x W."""
    height, width = shape
    white = rng.standard_normal((channels, height, width)).astype(np.float32)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy * fy + fx * fx)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(white) * (radius ** -beta).astype(np.float32)
    spectrum[:, 0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
    return noise / (noise.std(axis=(1, 2), keepdims=True) + 1e-6)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """K x 3 HSV in [0, 1] -> K x 3 RGB in [0, 1]."""
    h, s, v = hsv[:, 0] * 6.0, hsv[:, 1], hsv[:, 2]
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None]) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _palette(rng) -> np.ndarray:
    """2 to 5 colours around a random hue (K x 3 RGB): analogous, complementary or muted."""
    count = int(rng.integers(2, 6))
    base = rng.uniform()
    spread = rng.choice([0.05, 0.15, 0.5])
    hues = (base + rng.uniform(-spread, spread, count) + (rng.uniform() < 0.3) * 0.5 * (np.arange(count) % 2)) % 1.0
    saturation = np.clip(rng.uniform(0.1, 1.0) + rng.uniform(-0.2, 0.2, count), 0.0, 1.0)
    value = np.clip(rng.uniform(0.15, 1.0, count), 0.05, 1.0)
    return _hsv_to_rgb(np.stack([hues, saturation, value], 1))


def _apply_palette(level: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a field in [0, 1] (H x W) through a palette (K x 3) by linear interpolation."""
    stops = np.linspace(0.0, 1.0, len(palette))
    flat = level.reshape(-1)
    rgb = np.stack([np.interp(flat, stops, palette[:, c]) for c in range(3)], 1)
    return rgb.reshape(*level.shape, 3).astype(np.float32)


def _rotated_grid(rng, shape):
    """Pixel coordinates rotated by a random angle, each H x W."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    return np.cos(angle) * cols + np.sin(angle) * rows, -np.sin(angle) * cols + np.cos(angle) * rows


def _pattern(rng, shape, unit: float) -> np.ndarray:
    """One scalar pattern in [0, 1] (H x W): noise, stripes, checkers, gradient, cells or spots.

    ``unit`` is the texel scale of the scene (1 at 256 x 256), so that periods follow the size.
    """
    kind = rng.choice(["noise", "stripes", "checkers", "gradient", "cells", "spots"],
                      p=[0.25, 0.17, 0.13, 0.12, 0.2, 0.13])
    if kind == "noise":
        return _squash(_fractal_noise(rng, shape, rng.uniform(0.9, 1.8))[0], rng.uniform(0.6, 1.5))
    if kind in ("stripes", "checkers"):
        u, v = _rotated_grid(rng, shape)
        period = max(3.0, rng.uniform(5, 28) * unit)
        # wobbly stripes: a low-frequency phase warp makes them organic rather than ruled
        warp = _fractal_noise(rng, shape, 2.2)[0] * rng.uniform(0, 2.5)
        sharp = rng.uniform(1.0, 5.0)
        wave = np.tanh(sharp * np.sin(2 * np.pi * u / period + warp))
        if kind == "checkers":
            wave = wave * np.tanh(sharp * np.sin(2 * np.pi * v / (period * rng.uniform(0.7, 1.4)) + warp))
        return 0.5 * (1 + wave / np.tanh(sharp))
    if kind == "gradient":
        u, _ = _rotated_grid(rng, shape)
        ramp = (u - u.min()) / (np.ptp(u) + 1e-6)
        return np.clip(ramp + 0.25 * _fractal_noise(rng, shape, 1.2)[0] * rng.uniform(0.2, 1.0), 0, 1)
    if kind == "cells":
        return _cells(rng, shape, max(4.0, rng.uniform(8, 40) * unit))
    band = _fractal_noise(rng, shape, 2.0)[0] - 0.6 * _fractal_noise(rng, shape, 3.0)[0]
    return _squash(np.tanh(3.0 * (band - rng.uniform(-0.5, 0.8))), 1.0)


def _cells(rng, shape, cell: float) -> np.ndarray:
    """A Voronoi mosaic: each pixel takes the random value of its nearest seed, with darker seams."""
    from scipy import ndimage

    height, width = shape
    count = max(2, int(height * width / cell**2))
    seeds = np.ones(shape, dtype=bool)
    rows, cols = rng.integers(0, height, count), rng.integers(0, width, count)
    seeds[rows, cols] = False
    distance, (near_rows, near_cols) = ndimage.distance_transform_edt(seeds, return_indices=True)
    values = rng.uniform(0, 1, shape).astype(np.float32)
    values[rows, cols] = rng.uniform(0, 1, count)
    level = values[near_rows, near_cols]
    # shade each cell towards its centre so cells read as facets, not flat patches
    return np.clip(level * (1.0 - 0.35 * np.tanh(distance / cell)), 0, 1).astype(np.float32)


def make_texture(rng, shape, unit: float) -> np.ndarray:
    """A rich colour texture (H x W x 3 in [0, 1]): a palette-mapped pattern, sometimes a
    second pattern blended in, low-frequency shading, and fine coloured detail."""
    from scipy import ndimage

    rgb = _apply_palette(_pattern(rng, shape, unit), _palette(rng))
    if rng.uniform() < 0.45:
        other = _apply_palette(_pattern(rng, shape, unit), _palette(rng))
        weight = _squash(_fractal_noise(rng, shape, 2.0)[0], rng.uniform(1.0, 4.0))[..., None]
        rgb = rgb * (1 - weight) + other * weight
    shading = 0.65 + 0.35 * _squash(_fractal_noise(rng, shape, 2.2)[0])
    detail = _fractal_noise(rng, shape, 1.1, channels=3).transpose(1, 2, 0)
    rgb = rgb * shading[..., None] + rng.uniform(0.02, 0.07) * detail
    # a camera's optics pass little at the Nyquist frequency: a slight blur makes the
    # texture look filmed and keeps resampling (rendering, warping) faithful
    rgb = ndimage.gaussian_filter(rgb, sigma=(0.6, 0.6, 0), mode="wrap")
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)
