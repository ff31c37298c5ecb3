"""Procedural video scenes with exact object masks and exact optical flow.

A scene is a stack of layers. Layer 0 is a large textured background canvas seen through
a moving camera (translation, a slow zoom and a small roll); layers 1..M are textured
objects (ellipses, convex polygons, smooth blobs, stars, rings), each with its own
smooth path (translation, rotation, scale), drawn in a fixed depth order so that they
occlude each other, and free to leave and re-enter the frame partly.

Every layer l has, at frame t, an exact affine map from its texture to the screen,

    x_screen = M_l(t) [u, v, 1]^T,   M_l(t) = C(t) O_l(t)       (3 x 3, homogeneous),

with C(t) the camera (world -> screen) and O_l(t) the object's pose (texture -> world;
the identity for the background). A frame is rendered by backward mapping: each screen
pixel x is sent to M_l(t)^{-1} x, the texture is sampled there (bilinear), the shape's
signed distance gives a one-pixel anti-aliased alpha, and the layers are composited back
to front. The object id of a pixel is the front-most layer whose alpha is >= 1/2, and
its forward flow to frame t+1 is exact,

    flow_t(x) = M_l(t+1) M_l(t)^{-1} x - x,   l = the id at x,

the position at t+1 of the surface point seen at x, minus x, in pixels (u, v).
Pixel centres are at integer coordinates: pixel (row i, column j) is x = (j, i).

Everything is vectorized numpy; the same seed gives the same scene, bit for bit.
``fmapicon.data.synth_layout.write_scenes`` stores scenes in the DAVIS-2017 layout with
``Flow/`` and ``Videos/``; the shapes and textures are ``fmapicon.data.synth_shapes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from fmapicon.data.synth_shapes import make_texture, random_shape
from fmapicon.errors import UserError


@dataclass
class Scene:
    """One synthetic sequence with its ground truth.

    Attributes
    ----------
    frames : uint8 array, T x H x W x 3, RGB.
    masks : uint8 array, T x H x W, object ids 0 (background) .. M.
    flows : float32 array, (T-1) x H x W x 2, forward flow (u, v) in pixels from frame t
        to frame t+1 of the front-most surface at each pixel.
    visible : bool array, (T-1) x H x W, or None: True where the surface seen at x in frame
        t is still seen at x + flow in frame t+1 (inside the frame, not occluded), decided
        from the layers' exact shapes, not from the rendered masks.
    """

    frames: np.ndarray
    masks: np.ndarray
    flows: np.ndarray
    visible: np.ndarray | None = None


# ---------------------------------------------------------------------------------------
# homogeneous 2-D transforms (3 x 3), applied to column vectors (x, y, 1)


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _rotation_scale(angle: float, scale: float) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _apply(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3 x 3 affine matrix to coordinate arrays of any shape (their dtype is kept)."""
    (a, b, c), (d, e, f) = np.asarray(matrix)[:2].tolist()  # python floats do not upcast float32
    return a * x + b * y + c, d * x + e * y + f


# ---------------------------------------------------------------------------------------
# sampling and compositing


def _bilinear(texture: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample an H x W x C texture at fractional (rows, cols) (clamped to the edge) -> ... x C."""
    height, width = texture.shape[:2]
    rows = np.clip(rows, 0.0, height - 1.0001).astype(np.float32)
    cols = np.clip(cols, 0.0, width - 1.0001).astype(np.float32)
    r0 = rows.astype(np.int32)
    c0 = cols.astype(np.int32)
    fr = (rows - r0)[..., None]
    fc = (cols - c0)[..., None]
    flat = texture.reshape(height * width, -1)
    index = (r0 * width + c0).reshape(-1)
    shape = (*rows.shape, flat.shape[1])
    # np.take on a flat index is about twice as fast as fancy indexing here
    corners = [np.take(flat, index + offset, axis=0).reshape(shape) for offset in (0, 1, width, width + 1)]
    top = corners[0] + (corners[1] - corners[0]) * fc
    bottom = corners[2] + (corners[3] - corners[2]) * fc
    return top + (bottom - top) * fr


@dataclass
class Layer:
    """One textured layer. ``to_screen[t]`` maps texture pixel coordinates (column, row,
    1) to screen coordinates at frame t; ``shape`` is None for the background (opaque)."""

    texture: np.ndarray
    to_screen: np.ndarray  # T x 3 x 3
    shape: object = None
    centre: tuple[float, float] = (0.0, 0.0)  # texture (column, row) of the shape's origin

    def footprint(self, t: int, height: int, width: int):
        """The screen rows and columns (slices) this layer can cover at frame t."""
        if self.shape is None:
            return slice(0, height), slice(0, width)
        r = self.shape.radius + 2.0
        cx, cy = self.centre
        corners_x = np.array([cx - r, cx + r, cx - r, cx + r])
        corners_y = np.array([cy - r, cy - r, cy + r, cy + r])
        sx, sy = _apply(self.to_screen[t], corners_x, corners_y)
        cols = slice(max(0, int(np.floor(sx.min()))), min(width, int(np.ceil(sx.max())) + 1))
        rows = slice(max(0, int(np.floor(sy.min()))), min(height, int(np.ceil(sy.max())) + 1))
        return rows, cols

    def sample(self, t: int, rows: slice, cols: slice):
        """Colour (h x w x 3) and alpha (h x w) of this layer over a screen window at frame t."""
        # float32 is ample for rendering (flows are computed in float64)
        ys, xs = np.mgrid[rows, cols].astype(np.float32)
        u, v = _apply(np.linalg.inv(self.to_screen[t]), xs, ys)
        colour = _bilinear(self.texture, v, u)
        if self.shape is None:
            return colour, np.ones(xs.shape, dtype=np.float32)
        # texels -> screen pixels, so that the anti-aliased edge is one screen pixel wide
        pixels_per_texel = np.sqrt(abs(np.linalg.det(self.to_screen[t][:2, :2])))
        distance = self.shape.sdf(u - self.centre[0], v - self.centre[1]) * pixels_per_texel
        return colour, np.clip(distance + 0.5, 0.0, 1.0).astype(np.float32)


@dataclass
class SceneModel:
    """A scene as parametric layers: render any frame, or the exact flow, on demand.

    ``layers[0]`` is the background; ``layers[k]`` is object id k; ``depth`` lists the
    object ids back to front.
    """

    size: tuple[int, int]
    frames: int
    layers: list
    depth: list = field(default_factory=list)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t as (H x W x 3 uint8 RGB, H x W uint8 object ids)."""
        image, ids = self._composite(t)
        return np.round(image * 255.0).astype(np.uint8), ids

    def _composite(self, t: int):
        height, width = self.size
        image = np.zeros((height, width, 3), dtype=np.float32)
        ids = np.zeros((height, width), dtype=np.uint8)
        for layer_id in [0, *self.depth]:
            layer = self.layers[layer_id]
            rows, cols = layer.footprint(t, height, width)
            if rows.stop <= rows.start or cols.stop <= cols.start:
                continue
            colour, alpha = layer.sample(t, rows, cols)
            image[rows, cols] = image[rows, cols] * (1 - alpha[..., None]) + colour * alpha[..., None]
            ids[rows, cols][alpha >= 0.5] = layer_id
        return image, ids

    def ids(self, t: int) -> np.ndarray:
        """The H x W object ids of frame t (same as ``render(t)[1]``)."""
        return self._composite(t)[1]

    def flow(self, t: int, ids: np.ndarray, gap: int = 1) -> np.ndarray:
        """Exact forward flow t -> t+gap (H x W x 2 float32, u, v) given frame t's ids: the
        surface point seen at x in frame t is at M_l(t + gap) M_l(t)^-1 x in frame t + gap."""
        height, width = self.size
        flow = np.zeros((height, width, 2), dtype=np.float32)
        for layer_id in np.unique(ids):
            layer = self.layers[layer_id]
            rows, cols = np.nonzero(ids == layer_id)
            step = layer.to_screen[t + gap] @ np.linalg.inv(layer.to_screen[t])
            x, y = cols.astype(np.float64), rows.astype(np.float64)
            nx, ny = _apply(step, x, y)
            flow[rows, cols, 0] = nx - x
            flow[rows, cols, 1] = ny - y
        return flow

    def visibility(self, t: int, ids: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """H x W bool: the surface at x in frame t is front-most at x + flow(x) in frame t+1.

        Decided from the exact shapes: the target lies inside the frame, its own layer
        covers it (alpha >= 1/2, i.e. signed distance >= 0) and no layer in front does.
        """
        height, width = self.size
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
        x, y = cols + flow[..., 0], rows + flow[..., 1]
        visible = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
        order = [0, *self.depth]
        rank = np.zeros(len(self.layers), dtype=np.int64)
        rank[order] = np.arange(len(order))
        for layer_id in self.depth:
            covers = self._covers(layer_id, t + 1, x, y)
            in_front = rank[ids] < rank[layer_id]
            # a layer in front hides the point; its own layer must still hold it
            visible &= np.where(ids == layer_id, covers, ~(covers & in_front))
        return visible

    def _covers(self, layer_id: int, t: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether layer ``layer_id`` alone covers the screen points (x, y) at frame t."""
        layer = self.layers[layer_id]
        rows, cols = layer.footprint(t, *self.size)
        # only points inside the layer's screen bounding box can be covered
        near = (x >= cols.start - 1) & (x <= cols.stop) & (y >= rows.start - 1) & (y <= rows.stop)
        covers = np.zeros(x.shape, dtype=bool)
        u, v = _apply(np.linalg.inv(layer.to_screen[t]), x[near], y[near])
        covers[near] = layer.shape.sdf(u - layer.centre[0], v - layer.centre[1]) >= 0
        return covers


# ---------------------------------------------------------------------------------------
# motion


def _wobble(rng, frames: int, amplitude: float) -> np.ndarray:
    """A smooth zero-start oscillation a (sin(w t + p) - sin p) over t = 0..T-1."""
    t = np.arange(frames)
    omega, phase = rng.uniform(0.04, 0.3), rng.uniform(0, 2 * np.pi)
    return amplitude * (np.sin(omega * t + phase) - np.sin(phase))


def _camera_path(rng, frames: int, size: tuple[int, int]) -> np.ndarray:
    """World -> screen matrices (T x 3 x 3): the camera looks at c(t), zooms and rolls slowly."""
    height, width = size
    unit = min(size) / 256.0
    t = np.arange(frames)
    # keep the total drift bounded for long sequences: at most about a frame size
    speed = min(rng.uniform(0.2, 2.0) * unit, 0.8 * min(size) / max(frames, 1))
    heading = rng.uniform(0, 2 * np.pi)
    cx = speed * np.cos(heading) * t + _wobble(rng, frames, rng.uniform(0, 6) * unit)
    cy = speed * np.sin(heading) * t + _wobble(rng, frames, rng.uniform(0, 6) * unit)
    zoom_rate = min(0.004, 0.3 / frames)  # long sequences zoom no more than about e^0.3 in all
    zoom = np.exp(rng.uniform(-zoom_rate, zoom_rate) * t + _wobble(rng, frames, rng.uniform(0, 0.05)))
    roll = rng.uniform(-0.004, 0.004) * t + _wobble(rng, frames, rng.uniform(0, 0.03))
    centre = _translation((width - 1) / 2.0, (height - 1) / 2.0)
    return np.stack([centre @ _rotation_scale(roll[i], zoom[i]) @ _translation(-cx[i], -cy[i])
                     for i in range(frames)])


def _object_path(rng, frames: int, size: tuple[int, int], start_world: np.ndarray) -> np.ndarray:
    """Texture-origin -> world matrices (T x 3 x 3): translation, rotation and scale over time."""
    unit = min(size) / 256.0
    t = np.arange(frames)
    speed = min(rng.uniform(0.3, 3.0) * unit, 1.2 * min(size) / max(frames, 1))
    heading = rng.uniform(0, 2 * np.pi)
    x = start_world[0] + speed * np.cos(heading) * t + _wobble(rng, frames, rng.uniform(0, 20) * unit)
    y = start_world[1] + speed * np.sin(heading) * t + _wobble(rng, frames, rng.uniform(0, 20) * unit)
    spin = rng.uniform(-0.035, 0.035)
    angle = rng.uniform(0, 2 * np.pi) + spin * t + _wobble(rng, frames, rng.uniform(0, 0.3))
    growth_rate = min(0.008, 0.5 / frames)  # objects grow or shrink at most about e^0.5 in all
    growth = rng.uniform(-growth_rate, growth_rate)
    scale = np.exp(growth * t + _wobble(rng, frames, rng.uniform(0, 0.2)))
    return np.stack([_translation(x[i], y[i]) @ _rotation_scale(angle[i], scale[i]) for i in range(frames)])


# ---------------------------------------------------------------------------------------
# building a scene


def _background(rng, camera: np.ndarray, size: tuple[int, int]) -> Layer:
    """A canvas that covers everything the camera sees, textured, with static clutter shapes."""
    height, width = size
    xs = np.array([0.0, width - 1.0, 0.0, width - 1.0])
    ys = np.array([0.0, 0.0, height - 1.0, height - 1.0])
    seen = np.concatenate([np.stack(_apply(np.linalg.inv(m), xs, ys), 1) for m in camera])
    low = np.floor(seen.min(0)) - 3
    high = np.ceil(seen.max(0)) + 3
    canvas_w, canvas_h = (high - low).astype(int) + 1
    unit = min(size) / 256.0
    texture = make_texture(rng, (canvas_h, canvas_w), unit)
    _paint_clutter(rng, texture, unit)
    # canvas pixel (u, v) is the world point low + (u, v)
    to_screen = np.stack([m @ _translation(low[0], low[1]) for m in camera])
    return Layer(texture, to_screen)


def _paint_clutter(rng, canvas: np.ndarray, unit: float) -> None:
    """Paint a few static textured shapes into the background canvas (in place)."""
    height, width = canvas.shape[:2]
    for _ in range(int(rng.integers(2, 9))):
        shape = random_shape(rng, rng.uniform(10, 45) * unit)
        r = int(np.ceil(shape.radius)) + 2
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        rows = slice(max(0, int(cy) - r), min(height, int(cy) + r + 1))
        cols = slice(max(0, int(cx) - r), min(width, int(cx) + r + 1))
        if rows.stop <= rows.start or cols.stop <= cols.start:
            continue
        ys, xs = np.mgrid[rows, cols].astype(np.float32)
        alpha = np.clip(shape.sdf(xs - cx, ys - cy) + 0.5, 0, 1)[..., None]
        patch = make_texture(rng, alpha.shape[:2], unit)
        canvas[rows, cols] = canvas[rows, cols] * (1 - alpha) + patch * alpha


def _objects(rng, count: int, camera: np.ndarray, size: tuple[int, int], frames: int) -> list[Layer]:
    """``count`` textured objects whose centres start inside the first frame."""
    height, width = size
    unit = min(size) / 256.0
    layers = []
    for _ in range(count):
        shape = random_shape(rng, rng.uniform(0.08, 0.3) * min(size))
        side = int(np.ceil(2 * shape.radius)) + 5
        texture = make_texture(rng, (side, side), unit)
        centre = ((side - 1) / 2.0, (side - 1) / 2.0)
        start_screen = np.array([rng.uniform(0.12, 0.88) * (width - 1), rng.uniform(0.12, 0.88) * (height - 1)])
        start_world = np.array(_apply(np.linalg.inv(camera[0]), start_screen[0], start_screen[1]))
        pose = _object_path(rng, frames, size, start_world)
        to_screen = np.stack([camera[i] @ pose[i] @ _translation(-centre[0], -centre[1]) for i in range(frames)])
        layers.append(Layer(texture, to_screen, shape, centre))
    return layers


def build_scene(seed: int, frames: int = 30, size: tuple[int, int] = (256, 256), objects: int = 3) -> SceneModel:
    """The parametric model of scene ``seed``: textures and motions, no frames rendered yet.

    Every object is visible in frame 0 (at least 30% of its area, re-drawing the
    placement a few times otherwise), so that a first-frame annotation names them all.
    """
    height, width = check_size(size)
    check_counts(frames, objects)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5C3E]))
    camera = _camera_path(rng, frames, (height, width))
    background = _background(rng, camera, (height, width))
    model = None
    for _ in range(8):
        layers = _objects(rng, objects, camera, (height, width), frames)
        model = SceneModel((height, width), frames, [background, *layers], list(rng.permutation(objects) + 1))
        if _all_visible(model, share=0.3):
            break
    return model


def _all_visible(model: SceneModel, share: float) -> bool:
    """Whether every object shows at least ``share`` of its own area in frame 0."""
    ids = model.ids(0)
    counts = np.bincount(ids.reshape(-1), minlength=len(model.layers))
    for object_id, layer in enumerate(model.layers[1:], start=1):
        side_rows, side_cols = layer.texture.shape[:2]
        v, u = np.mgrid[0:side_rows, 0:side_cols]
        texels = np.count_nonzero(layer.shape.sdf(u - layer.centre[0], v - layer.centre[1]) >= 0)
        full_area = texels * abs(np.linalg.det(layer.to_screen[0][:2, :2]))
        if counts[object_id] < share * full_area:
            return False
    return True


def check_counts(frames: int, objects: int) -> None:
    if frames < 2:
        raise UserError(f"a scene needs at least 2 frames, got frames={frames}")
    if not 0 <= objects <= 254:
        raise UserError(f"objects must be in 0..254 (ids fit a uint8 with 255 void), got {objects}")


def check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError) as error:
        raise UserError(f"size must be (height, width), got {size!r}") from error
    if height < 16 or width < 16:
        raise UserError(f"size must be at least 16 x 16, got {height} x {width}")
    return height, width


def generate_scene(seed: int, frames: int = 30, size: tuple[int, int] = (256, 256), objects: int = 3,
                   visibility: bool = True) -> Scene:
    """Render a whole scene: frames (T x H x W x 3 uint8), masks (T x H x W uint8 ids 0..M),
    exact forward flows ((T-1) x H x W x 2 float32) and, when ``visibility``, where each
    flow lands on the same, unoccluded surface. Deterministic in ``seed``."""
    model = build_scene(seed, frames, size, objects)
    rendered = [model.render(t) for t in range(frames)]
    images = np.stack([r[0] for r in rendered])
    masks = np.stack([r[1] for r in rendered])
    flows = np.stack([model.flow(t, masks[t]) for t in range(frames - 1)])
    visible = None
    if visibility:
        visible = np.stack([model.visibility(t, masks[t], flows[t]) for t in range(frames - 1)])
    return Scene(images, masks, flows, visible)


# ---------------------------------------------------------------------------------------
# naming the scenes of a set


def sequence_name(index: int) -> str:
    """The name of the index-th synthetic sequence: synth-0000, synth-0001, ..."""
    return f"synth-{index:04d}"


def scene_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` of a set written with ``seed`` (independent streams)."""
    digest = hashlib.sha256(f"fmapicon-synth:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
