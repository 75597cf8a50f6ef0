"""Ray-casting the procedural world's scenes: frames, exact inverse depth, exact forward flow.

Analytic ray casting vectorised over frames and pixels with torch. Inverse depth is
1 / camera z (0 for the sky; MiDaS-like: larger is nearer); flow is where each pixel's surface
point lands in the next frame, in pixels. Camera: x right, y up, z forward; pixel (row i,
column j) has its centre at (j + 0.5, i + 0.5); flow channels are (dx, dy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from data.world_scene import Body, Material, Scene

HORIZON, ZENITH = (0.85, 0.88, 0.92), (0.35, 0.55, 0.90)
AMBIENT = 0.45


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
