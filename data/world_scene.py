"""The procedural world's scenes: materials, bodies, a camera path, drawn from a seed.

A scene is a textured floor, 1-3 spheres / boxes / upright cylinders (some moving and
spinning) and a camera moving over the floor; it names itself in a caption (colours,
patterns, shapes). World: y is up, the floor is the plane y = 0. Rendering: ``world_render``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
