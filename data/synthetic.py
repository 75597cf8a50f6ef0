"""The procedural world: textured primitives on a textured floor, seen by a moving camera.

A scene (camera path, floor, 1-3 spheres / boxes / upright cylinders, some moving and
spinning) is drawn from a seed and ray-cast analytically, vectorised over frames and pixels
with torch. Each clip therefore comes with exact inverse depth (1 / camera z, 0 for the sky;
MiDaS-like: larger is nearer) and exact forward flow (where each pixel's surface point lands
in the next frame, in pixels), and a caption naming colours, patterns and shapes.

World: y is up, the floor is the plane y = 0. Camera: x right, y up, z forward; pixel
(row i, column j) has its centre at (j + 0.5, i + 0.5); flow channels are (dx, dy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from data.video import parse_size

COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.50, 0.10),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.20, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.50, 0.20, 0.70),
    "pink": (0.95, 0.50, 0.70),
    "cyan": (0.10, 0.75, 0.80),
    "brown": (0.50, 0.30, 0.15),
    "grey": (0.50, 0.50, 0.50),
    "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
}
PATTERNS = ("plain", "striped", "checkered", "dotted")
SHAPES = ("sphere", "box", "cylinder")
SPLIT_OFFSETS = {"train": 0, "val": 10**8, "test": 2 * 10**8}
AMBIENT = 0.45
HORIZON, ZENITH = (0.85, 0.88, 0.92), (0.35, 0.55, 0.90)


@dataclass(frozen=True)
class Material:
    """A named colour with a pattern (``frequency`` cycles per unit; stripe ``angle``)."""

    colour: str
    pattern: str
    frequency: float
    angle: float = 0.0

    def describe(self) -> str:
        """Words for a caption: 'red striped', or 'red' for a plain material."""
        return self.colour if self.pattern == "plain" else f"{self.colour} {self.pattern}"

    def colours(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base colour and the pattern's second colour (white on dark bases, else dark)."""
        base = torch.tensor(COLOURS[self.colour])
        luminance = float(base @ torch.tensor([0.3, 0.59, 0.11]))
        second = torch.full((3,), 0.95) if luminance < 0.6 else base * 0.25
        return base, second


@dataclass(frozen=True)
class Body:
    """A primitive resting on the floor, moving with constant velocity and spin.

    ``dims``: sphere (radius,), box (half x, half y, half z), cylinder (radius, height).
    Its local frame is centred on the sphere or box, at the base centre of the cylinder.
    """

    shape: str
    material: Material
    dims: tuple[float, ...]
    position: tuple[float, float]  # (x, z) at frame 0
    velocity: tuple[float, float]  # (x, z) per frame
    yaw: float
    spin: float  # radians per frame

    def pose(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation (T, 3, 3) about y and origin (T, 3) of the local frame at ``times``."""
        angle = self.yaw + self.spin * times
        cos, sin, zero, one = (
            angle.cos(),
            angle.sin(),
            torch.zeros_like(angle),
            torch.ones_like(angle),
        )
        rotation = torch.stack([cos, zero, sin, zero, one, zero, -sin, zero, cos], -1)
        lift = -self.vertical_extent()[0]  # resting on the floor
        origin = torch.stack(
            [
                self.position[0] + self.velocity[0] * times,
                torch.full_like(times, lift),
                self.position[1] + self.velocity[1] * times,
            ],
            -1,
        )
        return rotation.view(-1, 3, 3), origin

    def vertical_extent(self) -> tuple[float, float]:
        """Lowest and highest y of the body relative to its local origin."""
        if self.shape == "cylinder":
            return 0.0, self.dims[1]
        half = self.dims[1] if self.shape == "box" else self.dims[0]
        return -half, half

    def footprint_radius(self) -> float:
        """Radius of the body's footprint on the floor (for spacing bodies apart)."""
        return math.hypot(self.dims[0], self.dims[2]) if self.shape == "box" else self.dims[0]


@dataclass(frozen=True)
class CameraPath:
    """A pinhole camera at fixed height and pitch, translating and yawing at constant rates."""

    height: float
    pitch: float  # radians below the horizon
    yaw: float
    yaw_rate: float  # radians per frame
    position: tuple[float, float]  # (x, z) at frame 0
    velocity: tuple[float, float]  # (x, z) per frame
    fov: float  # horizontal field of view, radians

    def pose(self, times: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Position, right, up and forward vectors (each (T, 3)) at ``times``."""
        yaw = self.yaw + self.yaw_rate * times
        cos_p, sin_p = math.cos(self.pitch), math.sin(self.pitch)
        forward = torch.stack(
            [yaw.sin() * cos_p, torch.full_like(yaw, -sin_p), yaw.cos() * cos_p], -1
        )
        right = torch.stack([yaw.cos(), torch.zeros_like(yaw), -yaw.sin()], -1)
        up = torch.linalg.cross(forward, right)
        position = torch.stack(
            [
                self.position[0] + self.velocity[0] * times,
                torch.full_like(times, self.height),
                self.position[1] + self.velocity[1] * times,
            ],
            -1,
        )
        return position, right, up, forward


@dataclass(frozen=True)
class Scene:
    """Everything that decides a clip: camera path, floor, bodies, light direction."""

    camera: CameraPath
    floor: Material
    bodies: tuple[Body, ...]
    light: tuple[float, float, float]

    def caption(self, seen: Sequence[int] | None = None) -> str:
        """E.g. 'a red striped sphere and a blue box on a green checkered floor'.

        ``seen``: indices of the bodies to name (those visible in the clip); default all.
        """
        bodies = [b for i, b in enumerate(self.bodies) if seen is None or i in seen]
        floor = _with_article(self.floor.describe() + " floor")
        if not bodies:
            return floor
        names = [_with_article(f"{b.material.describe()} {b.shape}") for b in bodies]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on {floor}"


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def sample_scene(
    seed: int, num_frames: int, num_objects: tuple[int, int] = (1, 3), speed: float = 1.0
) -> Scene:
    """Draw a scene from ``seed``: motions per frame scale with ``speed``; bodies stay clear
    of the camera's path and of each other over ``num_frames`` frames."""
    rng = np.random.default_rng(seed)
    yaw = rng.uniform(-math.pi, math.pi)
    heading = yaw + rng.uniform(-math.pi / 2, math.pi / 2)
    camera_speed = rng.uniform(0.02, 0.1) * speed
    camera = CameraPath(
        height=rng.uniform(1.0, 2.0),
        pitch=math.radians(rng.uniform(12, 30)),
        yaw=yaw,
        yaw_rate=math.radians(rng.uniform(-1, 1)) * speed,
        position=(0.0, 0.0),
        velocity=(camera_speed * math.sin(heading), camera_speed * math.cos(heading)),
        fov=math.radians(rng.uniform(50, 70)),
    )
    colour_names = list(COLOURS)
    floor_colour = colour_names[rng.integers(len(colour_names))]
    floor_pattern = PATTERNS[rng.integers(1, len(PATTERNS))]  # the floor is never plain
    floor = Material(floor_colour, floor_pattern, rng.uniform(0.6, 1.5), rng.uniform(0, math.pi))
    free_colours = [c for c in colour_names if c != floor_colour]
    times = np.arange(num_frames)
    camera_track = np.stack([camera.velocity[0] * times, camera.velocity[1] * times], -1)
    bodies: list[Body] = []
    for _ in range(rng.integers(num_objects[0], num_objects[1] + 1)):
        for _attempt in range(50):
            body = _sample_body(rng, camera, free_colours, speed)
            track = np.asarray(body.position) + np.outer(times, body.velocity)
            clear_of_camera = _min_distance(track, camera_track) > body.footprint_radius() + 0.5
            clear_of_bodies = all(
                _min_distance(track, np.asarray(o.position) + np.outer(times, o.velocity))
                > body.footprint_radius() + o.footprint_radius() + 0.05
                for o in bodies
            )
            if clear_of_camera and clear_of_bodies:
                bodies.append(body)
                free_colours.remove(body.material.colour)
                break
    if not bodies:  # cannot happen in practice: the first body only has to miss the camera
        raise RuntimeError(f"no body could be placed in scene {seed}")
    azimuth, elevation = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(35, 70))
    light = (
        math.cos(azimuth) * math.cos(elevation),
        math.sin(elevation),
        math.sin(azimuth) * math.cos(elevation),
    )
    return Scene(camera, floor, tuple(bodies), light)


def _sample_body(
    rng: np.random.Generator, camera: CameraPath, colours: list[str], speed: float
) -> Body:
    shape = SHAPES[rng.integers(len(SHAPES))]
    if shape == "sphere":
        dims: tuple[float, ...] = (rng.uniform(0.35, 0.8),)
    elif shape == "box":
        dims = tuple(rng.uniform(0.25, 0.6, size=3))
    else:
        dims = (rng.uniform(0.25, 0.5), rng.uniform(0.6, 1.6))
    distance = rng.uniform(2.5, 6.0)
    lateral = rng.uniform(-0.6, 0.6) * distance * math.tan(camera.fov / 2)
    sin_y, cos_y = math.sin(camera.yaw), math.cos(camera.yaw)
    position = (distance * sin_y + lateral * cos_y, distance * cos_y - lateral * sin_y)
    moving = rng.random() < 0.6
    direction, body_speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.05) * speed
    velocity = (body_speed * math.cos(direction), body_speed * math.sin(direction))
    spin = math.radians(rng.uniform(-3, 3)) * speed if rng.random() < 0.5 else 0.0
    material = Material(
        colours[rng.integers(len(colours))], PATTERNS[rng.integers(4)], rng.uniform(2.0, 4.0)
    )
    return Body(
        shape,
        material,
        tuple(float(d) for d in dims),
        position,
        velocity if moving else (0.0, 0.0),
        rng.uniform(0, 2 * math.pi),
        spin,
    )


def _min_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(a - b, axis=-1)))


@dataclass
class Render:
    """A rendered clip with its exact geometry."""

    frames: torch.Tensor  # (F, 3, H, W) in [-1, 1]
    inverse_depth: torch.Tensor  # (F, 1, H, W): 1 / camera z, 0 where the sky is seen
    flow: torch.Tensor  # (F - 1, 2, H, W): forward motion (dx, dy) in pixels
    surface: torch.Tensor  # (F, H, W) int64: -1 sky, 0 floor, k for body k - 1
    focal: float  # focal length in pixels (principal point at the image centre)


def render(scene: Scene, num_frames: int, size: tuple[int, int]) -> Render:
    """Ray-cast ``num_frames`` frames of ``scene`` at ``size`` (H, W), all pixels at once.

    The floor and the sky are shaded over the whole image, each body only inside the pixel
    window that can see it. Poses are evaluated for one frame more: flow looks ahead.
    """
    height, width = size
    times = torch.arange(num_frames + 1, dtype=torch.float32)
    position, right, up, forward = scene.camera.pose(times)
    now, later = slice(0, num_frames), slice(1, num_frames + 1)
    focal = 0.5 * width / math.tan(scene.camera.fov / 2)
    across = (torch.arange(width) + 0.5 - width / 2) / focal
    down = (torch.arange(height) + 0.5 - height / 2) / focal
    # Rays with unit forward component: the ray parameter at a hit is the camera z-depth.
    rays = (
        forward[now, None, None]
        + across[None, None, :, None] * right[now, None, None]
        - down[None, :, None, None] * up[now, None, None]
    )
    ray_square = rays.square().sum(-1)
    ray_length = ray_square.sqrt()
    origin, next_origin = position[now, None, None], position[later, None, None]
    light = torch.tensor(scene.light)

    # The floor (static) where rays point down, the sky (at infinity) elsewhere.
    on_floor = rays[..., 1] < -1e-6
    depth = torch.where(on_floor, origin[..., 1] / -rays[..., 1].clamp(max=-1e-6), 0.0)
    point = origin + depth[..., None] * rays
    footprint = depth * ray_square / (focal * (-rays[..., 1]).clamp(min=0.2 * ray_length))
    coverage = _pattern(scene.floor, point[..., ::2], footprint)  # (x, z)
    floor_colour = _albedo(scene.floor, coverage) * (AMBIENT + (1 - AMBIENT) * max(light[1], 0))
    elevation = (rays[..., 1:2] / ray_length[..., None]).clamp(0, 1)
    sky_colour = torch.tensor(HORIZON) * (1 - elevation) + torch.tensor(ZENITH) * elevation
    colour = torch.where(on_floor[..., None], floor_colour, sky_colour)
    ahead = torch.where(on_floor[..., None], point - next_origin, rays)  # seen from next camera
    depth = torch.where(on_floor, depth, math.inf)
    surface = on_floor.long() - 1

    for k, body in enumerate(scene.bodies, start=1):
        rotation, body_origin = body.pose(times)
        window = _screen_window(body, body_origin[now], position, right, up, forward, focal, size)
        if window is None:
            continue
        crop = (slice(None), slice(window[0], window[1]), slice(window[2], window[3]))
        d = rays[crop]
        t = _intersect(body, rotation[now], body_origin[now], position[now], d)
        closer = t < depth[crop]
        if not bool(closer.any()):
            continue
        t = torch.where(closer, t, 0.0)
        local_origin = torch.einsum("fj,fji->fi", position[now] - body_origin[now], rotation[now])
        local_direction = torch.einsum("fhwj,fji->fhwi", d, rotation[now])
        local = local_origin[:, None, None] + t[..., None] * local_direction
        normal = _local_normal(body, local)
        facing = (normal * local_direction).sum(-1).abs()
        footprint = t * ray_square[crop] / (focal * facing.clamp(min=0.2 * ray_length[crop]))
        coverage = _pattern(body.material, local, footprint)
        world_normal = torch.einsum("fij,fhwj->fhwi", rotation[now], normal)
        lambert = (world_normal @ light).clamp(min=0)[..., None]
        shaded = _albedo(body.material, coverage) * (AMBIENT + (1 - AMBIENT) * lambert)
        moved = (
            torch.einsum("fij,fhwj->fhwi", rotation[later], local) + body_origin[later, None, None]
        )
        inside = closer[..., None]
        colour[crop] = torch.where(inside, shaded, colour[crop])
        ahead[crop] = torch.where(inside, moved - next_origin, ahead[crop])
        depth[crop] = torch.where(closer, t, depth[crop])
        surface[crop] = torch.where(closer, k, surface[crop])

    # Flow: project each pixel's point, as it is at the next frame, into the next camera.
    ahead = ahead[:-1]
    z = (ahead * forward[1:num_frames, None, None]).sum(-1).clamp(min=1e-6)
    x = width / 2 + focal * (ahead * right[1:num_frames, None, None]).sum(-1) / z
    y = height / 2 - focal * (ahead * up[1:num_frames, None, None]).sum(-1) / z
    flow = torch.stack(
        [x - (across * focal + width / 2), y - (down * focal + height / 2)[:, None]], 1
    )
    inverse_depth = torch.where(surface == -1, 0.0, 1 / depth.clamp(min=1e-6))
    return Render(
        frames=colour.clamp(0, 1).mul(2).sub(1).permute(0, 3, 1, 2).contiguous(),
        inverse_depth=inverse_depth[:, None],
        flow=flow,
        surface=surface,
        focal=focal,
    )


def _screen_window(
    body: Body,
    body_origin: torch.Tensor,
    position: torch.Tensor,
    right: torch.Tensor,
    up: torch.Tensor,
    forward: torch.Tensor,
    focal: float,
    size: tuple[int, int],
) -> tuple[int, int, int, int] | None:
    """Pixel rows and columns (top, bottom, left, right) that can see ``body`` in any frame.

    The corners of the body's bounding box are projected into each frame's camera; the
    whole image is returned when a corner is behind a camera, None when nothing is seen.
    """
    radius = body.footprint_radius()
    low, high = body.vertical_extent()
    corners = torch.tensor(
        [[x, y, z] for x in (-radius, radius) for y in (low, high) for z in (-radius, radius)]
    )
    num_frames = body_origin.shape[0]
    relative = body_origin[:, None] + corners - position[:num_frames, None]
    z = (relative * forward[:num_frames, None]).sum(-1)
    height, width = size
    if bool((z < 1e-3).any()):
        return 0, height, 0, width
    x = width / 2 + focal * (relative * right[:num_frames, None]).sum(-1) / z
    y = height / 2 - focal * (relative * up[:num_frames, None]).sum(-1) / z
    left, right_edge = max(0, math.floor(x.min()) - 1), min(width, math.ceil(x.max()) + 1)
    top, bottom = max(0, math.floor(y.min()) - 1), min(height, math.ceil(y.max()) + 1)
    if left >= right_edge or top >= bottom:
        return None
    return top, bottom, left, right_edge


def _intersect(
    body: Body,
    rotation: torch.Tensor,
    body_origin: torch.Tensor,
    origin: torch.Tensor,
    rays: torch.Tensor,
) -> torch.Tensor:
    """Ray parameter (F, H, W) of the first hit on ``body``; inf where the ray misses.

    ``rotation`` (F, 3, 3) and ``body_origin`` (F, 3): the body's pose; ``origin`` (F, 3):
    the camera; ``rays`` (F, H, W, 3). Spheres and cylinders are symmetric about their
    vertical axis, so only boxes need the rays in their local frame.
    """
    eps = 1e-4
    offset = origin - body_origin  # (F, 3)
    if body.shape == "box":
        half = torch.tensor(body.dims)
        local_origin = torch.einsum("fj,fji->fi", offset, rotation)[:, None, None]
        local_rays = torch.einsum("fhwj,fji->fhwi", rays, rotation)
        local_rays = torch.where(local_rays.abs() < 1e-9, 1e-9, local_rays)
        near, far = (-half - local_origin) / local_rays, (half - local_origin) / local_rays
        enter, leave = torch.minimum(near, far).amax(-1), torch.maximum(near, far).amin(-1)
        return torch.where((enter <= leave) & (enter > eps), enter, math.inf)
    radius = body.dims[0]
    if body.shape == "sphere":
        a = rays.square().sum(-1)
        b = torch.einsum("fhwj,fj->fhw", rays, offset)
        c = offset.square().sum(-1)[:, None, None] - radius**2
        disc = b * b - a * c
        t = (-b - disc.clamp(min=0).sqrt()) / a
        return torch.where((disc > 0) & (t > eps), t, math.inf)
    tall = body.dims[1]  # cylinder with its base at the local origin: side, then top cap
    dx, dy, dz = rays.unbind(-1)
    ox, oy, oz = (component[:, None, None] for component in offset.unbind(-1))
    a = (dx * dx + dz * dz).clamp(min=1e-12)
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - radius**2)
    side = (-b - disc.clamp(min=0).sqrt()) / a
    side_y = oy + side * dy
    side = torch.where((disc > 0) & (side > eps) & (side_y >= 0) & (side_y <= tall), side, math.inf)
    top = (tall - oy) / torch.where(dy.abs() < 1e-9, 1e-9, dy)
    top_r2 = (ox + top * dx) ** 2 + (oz + top * dz) ** 2
    top = torch.where((top > eps) & (top_r2 <= radius**2), top, math.inf)
    return torch.minimum(side, top)


def _local_normal(body: Body, point: torch.Tensor) -> torch.Tensor:
    """Outward unit normal at surface points (N, 3) given in the body's local frame."""
    if body.shape == "sphere":
        return point / body.dims[0]
    if body.shape == "box":
        scaled = point / torch.tensor(body.dims)
        axis = scaled.abs().argmax(-1, keepdim=True)
        return torch.zeros_like(point).scatter_(-1, axis, scaled.gather(-1, axis).sign())
    side = point * torch.tensor([1.0, 0.0, 1.0]) / body.dims[0]
    on_top = (point[..., 1:2] >= body.dims[1] - 1e-4).float()
    return side * (1 - on_top) + torch.tensor([0.0, 1.0, 0.0]) * on_top


def _pattern(material: Material, coords: torch.Tensor, footprint: torch.Tensor) -> torch.Tensor:
    """Pattern coverage in [0, 1] at surface ``coords`` (2-D floor or 3-D local body points).

    Edges are softened by the pixel's ``footprint`` (world units), so distant patterns fade
    to their mean instead of aliasing.
    """
    if material.pattern == "plain":
        return torch.zeros(coords.shape[:-1])
    wave = 2 * math.pi * material.frequency
    blur = (wave * footprint).clamp(min=0.15)
    if material.pattern == "striped":
        if coords.shape[-1] == 2:
            across = coords @ torch.tensor([math.cos(material.angle), math.sin(material.angle)])
        else:
            across = coords[..., 1]
        soft_sign = torch.tanh(torch.sin(wave * across) / blur)
    elif material.pattern == "checkered":
        soft_sign = torch.tanh(torch.sin(wave * coords) / blur[..., None]).prod(-1)
    else:  # dotted: discs of radius 0.3 cells around lattice points
        cell = coords * material.frequency
        off_centre = (cell - cell.round()).norm(dim=-1)
        soft_sign = torch.tanh((0.3 - off_centre) * 2 * math.pi / blur)
    return 0.5 + 0.5 * soft_sign


def _albedo(material: Material, coverage: torch.Tensor) -> torch.Tensor:
    base, second = material.colours()
    return base + (second - base) * coverage[..., None]


class SyntheticWorldDataset(Dataset):
    """``num_clips`` clips of the procedural world; clip i is fixed by (seed, split, i).

    Splits take disjoint seed ranges: scene seed = seed + SPLIT_OFFSETS[split] + i. ``speed``
    scales all motion per frame (2.0 looks like half the frame rate). Samples
    carry ``depth`` (inverse depth, 1 / camera z, 0 for sky) and, for F > 1, ``flow``.
    ``num_frames=1`` gives images (``is_video`` False) for joint image + video training.
    """

    def __init__(
        self,
        num_clips: int = 1000,
        num_frames: int = 8,
        size: int | Sequence[int] = 64,
        seed: int = 0,
        split: str = "train",
        num_objects: int | Sequence[int] = (1, 3),
        speed: float = 1.0,
    ) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
        if not 0 < num_clips <= 10**8:
            raise ValueError(f"num_clips must be in [1, 1e8], got {num_clips}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        low, high = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
        if not 1 <= low <= high:
            raise ValueError(
                f"num_objects must be n or (min, max) with 1 <= min <= max: {num_objects}"
            )
        self.num_clips, self.num_frames, self.size = num_clips, num_frames, parse_size(size)
        self.seed, self.split, self.num_objects, self.speed = (
            seed,
            split,
            (int(low), int(high)),
            speed,
        )

    def __len__(self) -> int:
        return self.num_clips

    def scene_seed(self, index: int) -> int:
        """The seed of clip ``index`` of this split."""
        return self.seed + SPLIT_OFFSETS[self.split] + index

    def scene(self, index: int) -> Scene:
        """The scene of clip ``index``."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range for {self.num_clips} clips")
        return sample_scene(self.scene_seed(index), self.num_frames, self.num_objects, self.speed)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        clip = render(scene, self.num_frames, self.size)
        height, width = self.size
        seen = [k - 1 for k in clip.surface.unique().tolist() if k > 0]
        sample = {
            "frames": clip.frames,
            "caption": scene.caption(seen),  # only the bodies the clip shows
            "is_video": self.num_frames > 1,
            "key": f"world#{self.scene_seed(index)}#{self.num_frames}x{height}x{width}",
            "depth": clip.inverse_depth,
        }
        if self.num_frames > 1:
            sample["flow"] = clip.flow
        return sample
