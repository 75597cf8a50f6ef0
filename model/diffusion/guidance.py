"""Gen-1's content and temporal guidance, SDEdit start and masked editing around a denoiser.

All three wrap or prepare a denoiser of sigma (``model.diffusion.samplers``), so any sampler
runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.diffusion.samplers import Denoiser
from model.diffusion.schedule import append_dims, batch_sigma


class Gen1Guidance:
    """Gen-1 guidance (Esser et al. 2023, eq. 7) in one batched call of the inner denoiser.

    ``pred = img(null) + w_t (vid(null) - img(null)) + w (vid(c) - vid(null))``, where ``img``
    runs with temporal layers off. Rewritten as
    ``(1 - w_t) img(null) + (w_t - w) vid(null) + w vid(c)``, a branch whose coefficient is 0 is
    not computed: w = w_t = 1 is one pass, w_t = 1 is plain classifier-free guidance on the
    video model. The inner denoiser gets ``temporal``, a bool tensor (n_branches * B,).

    The combination is of x0 predictions. At equal ``x`` and ``sigma`` x0 is an affine function
    of the model output, ``c_skip x + c_out F``, with the same ``c_skip``, ``c_out`` for every
    branch; the coefficients sum to 1, so combining x0 equals combining eps (or v) and then
    converting.
    """

    def __init__(self, denoiser: Denoiser, w: float = 1.0, w_t: float = 1.0) -> None:
        self.denoiser = denoiser
        self.w = float(w)
        self.w_t = float(w_t)

    def branches(self, w=None, w_t=None) -> list[tuple[str, bool, float | torch.Tensor]]:
        """``(content, temporal, coefficient)`` of each branch that is computed (``w``,
        ``w_t``: per-frame values, else the guidance's own); a coefficient that is 0 for
        every frame drops its branch."""
        w = self.w if w is None else w
        w_t = self.w_t if w_t is None else w_t
        all_branches = [("uncond", False, 1.0 - w_t), ("uncond", True, w_t - w), ("cond", True, w)]
        return [b for b in all_branches if bool(torch.as_tensor(b[2]).ne(0).any())]

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict | None = None,
        uncond: dict | None = None,
    ) -> torch.Tensor:
        """Guided x0 at ``(x, sigma)``. ``uncond`` overrides keys of ``cond`` for null branches
        (e.g. only ``context``); tensors are batched along dim 0, other values passed as is."""
        cond = dict(cond or {})
        if "temporal" in cond or "temporal" in (uncond or {}):
            raise ValueError("Gen1Guidance sets 'temporal' itself; remove it from cond/uncond")
        w, w_t = per_frame_scale(cond, "w", self.w), per_frame_scale(cond, "w_t", self.w_t)
        kwargs_of = {"cond": cond, "uncond": {**cond, **(uncond or {})}}
        branches = self.branches(w, w_t)  # never empty: the coefficients sum to 1
        batch = x.shape[0]
        sigma = batch_sigma(sigma, x)
        merged = batch_branches([kwargs_of[content] for content, _, _ in branches], batch)
        temporal = torch.tensor([t for _, t, _ in branches for _ in range(batch)], device=x.device)
        n = len(branches)
        out = self.denoiser(torch.cat([x] * n), torch.cat([sigma] * n), temporal=temporal, **merged)
        preds = out.chunk(n)
        return sum(coef * pred for (_, _, coef), pred in zip(branches, preds, strict=True))


def batch_branches(branches: list[dict], batch: int) -> dict:
    """One keyword dict for a batched call over guidance branches: tensors concatenated along
    dim 0 (each must have ``batch`` rows), other values passed when every branch holds the
    very same object (a key missing from a branch is an error for tensors).
    """
    merged = {}
    for key in dict.fromkeys(k for b in branches for k in b):
        values = [b.get(key) for b in branches]
        if all(isinstance(v, torch.Tensor) for v in values):
            if any(v.shape[0] != batch for v in values):
                raise ValueError(f"cond/uncond {key!r} must have batch size {batch} in dim 0")
            merged[key] = torch.cat(values)
        elif all(v is values[0] for v in values):
            merged[key] = values[0]
        else:
            raise ValueError(f"cond/uncond entry {key!r} is not a tensor in every branch")
    return merged


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022) of an image model, as SD samples it:
    ``uncond + w (cond - uncond)``, both branches in one batched call ordered [uncond, cond] as
    diffusers' ``StableDiffusionPipeline`` batches them. Combined on x0, which is affine in the
    model output with the same coefficients for both branches, so it equals guiding eps or v.
    ``w == 1`` runs the conditional branch alone.
    """

    def __init__(self, denoiser: Denoiser, w: float = 7.5) -> None:
        self.denoiser = denoiser
        self.w = float(w)

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: dict | None = None,
        uncond: dict | None = None,
    ) -> torch.Tensor:
        """Guided x0 at ``(x, sigma)``; ``uncond`` overrides keys of ``cond`` (e.g. ``context``)."""
        cond = dict(cond or {})
        w = per_frame_scale(cond, "w", self.w)
        if not isinstance(w, torch.Tensor) and w == 1.0:
            return self.denoiser(x, sigma, **cond)
        batch = x.shape[0]
        sigma = batch_sigma(sigma, x)
        merged = batch_branches([{**cond, **(uncond or {})}, cond], batch)
        out_uncond, out_cond = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), **merged
        ).chunk(2)
        return out_uncond + w * (out_cond - out_uncond)


def per_frame_scale(cond: dict, name: str, default: float) -> float | torch.Tensor:
    """A guidance scale given per frame in ``cond`` (``guidance_<name>``, ``(B, F, 1, 1, 1)``:
    a keyframe schedule, sliced with the frames by windows), removed from it; else
    ``default``."""
    value = cond.pop(f"guidance_{name}", None)
    return default if value is None else value


@dataclass
class Release:
    """When masked editing lets kept regions go: below ``sigma`` (broadcastable to the
    latents, e.g. ``(1, F, 1, 1, 1)``; -1: never) the mask is ``mask`` instead."""

    sigma: torch.Tensor
    mask: torch.Tensor

    def frames(self, index) -> Release:
        """The release of the frames ``index`` (dim 1)."""
        return Release(self.sigma[:, index], self.mask[:, index])


class MaskedDenoiser:
    """Masked editing: outside ``mask`` the sampler follows the source latents.

    Before each evaluation the unmasked region of ``x`` is replaced by the source noised to the
    current sigma (``source + sigma * noise``), and the unmasked region of the returned x0 is the
    source itself. Every sampler's last step returns x0 at sigma = 0, so the unmasked latents end
    equal to the source. ``mask`` is 1 where the content is regenerated, broadcastable to ``x``.
    ``release``: below its sigma a kept region takes the release's own mask and is sampled
    on from where it is (a long edit's overlap frames, held for the first steps of the next
    window, then blended; ``model.editing.long``).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        source: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        release: Release | None = None,
    ) -> None:
        if noise.shape != source.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match source {tuple(source.shape)}")
        self.denoiser = denoiser
        self.source = source
        self.mask = mask.to(source.dtype)
        self.noise = noise
        self.release = release

    def mask_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The mask at ``sigma`` ``(B,)``: 1 also where a kept region was released."""
        if self.release is None:
            return self.mask
        released = append_dims(sigma, self.mask.ndim) < self.release.sigma
        return torch.where(released, self.release.mask.to(self.mask), self.mask)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        mask = self.mask_at(sigma)
        noised_source = self.source + append_dims(sigma, x.ndim) * self.noise
        x = mask * x + (1 - mask) * noised_source
        denoised = self.denoiser(x, sigma, **kwargs)
        return mask * denoised + (1 - mask) * self.source


def sdedit_steps(num_steps: int, strength: float) -> int:
    """How many of ``num_steps`` steps an SDEdit start at ``strength`` runs: ``strength`` times
    the steps, rounded down as diffusers' img2img does, but at least one whenever
    ``strength > 0`` (diffusers and A1111 run none for, e.g., 4 steps at strength 0.1)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return 0
    return min(num_steps, max(1, int(strength * num_steps)))


def sdedit_start(
    source: torch.Tensor, sigmas: torch.Tensor, strength: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): keep the last ``sdedit_steps(n, strength)`` of the ``n`` steps
    and start from the source latents noised to the first kept sigma. Returns ``(x, sigmas)``.

    strength 1 starts at sigma_max (almost pure noise); strength 0 returns the source unchanged.
    """
    n = len(sigmas) - 1
    sigmas = sigmas[n - sdedit_steps(n, strength) :]
    return source + sigmas[0] * noise, sigmas


def initial_latents(noise: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
    """Pure-noise start ``noise * sqrt(1 + sigma_max^2)``: x_T ~ N(0, 1) in the model's DDPM space
    (as diffusers starts; k-diffusion's scripts use ``noise * sigma_max``)."""
    return noise * (1 + sigma_max**2) ** 0.5


def sample(
    sampler,
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    source: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    release: Release | None = None,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    **sampler_kwargs,
) -> torch.Tensor:
    """Run ``sampler`` from ``noise``: from scratch (no ``source``), or SDEdit from ``source``
    at ``strength`` (1: the source noised to sigma_max, as diffusers' img2img), optionally with
    masked editing (``mask``, 1 = regenerate; ``release``: the sigma below which a kept region
    is let go, ``MaskedDenoiser``). The same ``noise`` noises the source throughout."""
    if source is not None:
        x, sigmas = sdedit_start(source, sigmas, strength, noise)
    elif mask is not None or strength < 1.0:
        raise ValueError("masked editing and strength < 1 need the source latents")
    else:
        x = initial_latents(noise, sigmas[0])
    if mask is not None:
        denoiser = MaskedDenoiser(denoiser, source, mask, noise, release)
        x = mask * x + (1 - mask) * (source + sigmas[0] * noise)
    if len(sigmas) < 2:
        return x
    return sampler(denoiser, x, sigmas, extra_args, callback, disable, **sampler_kwargs)
