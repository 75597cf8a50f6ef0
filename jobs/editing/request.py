"""What infer.py is asked to do, checked before anything is read: the required keys, one
content source, the frame range, the working size, the settings, the device and precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from data.media import (
    SourceVideo,
)
from model.editing.fifo import check_fifo_settings, fifo_room, frames_per_level
from model.editing.long import long_windows
from model.editing.methods import get_method, method_names
from model.editing.precision import native_bf16
from model.editing.settings import (
    EditSettings,
    settings_from_config,
)
from model.sd.files import checkpoint_kind
from model.sd.loading import peek_config
from model.weights.release import default_noise_correlation, native_resolution

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class InferError(Exception):
    """A bad input or setting, reported to the user as one line."""


@dataclass(frozen=True)
class Geometry:
    """Where an edit's pixels live. ``output`` (H, W) keeps the source's aspect ratio (exactly
    the source's size with ``resolution=source``), both sides even as H.264's 4:2:0 needs;
    the model works on ``working``, the output padded at the bottom and right (edge pixels
    repeated) to a multiple of the VAE's factor, and the edit is cropped back."""

    output: tuple[int, int]
    working: tuple[int, int]

    def pad(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, H, W)`` at the output size -> at the working size (edges repeated)."""
        (h, w), (ph, pw) = self.output, self.working
        if (h, w) == (ph, pw):
            return video
        flat = F.pad(video.flatten(0, 1), (0, pw - w, 0, ph - h), mode="replicate")
        return flat.unflatten(0, video.shape[:2])

    def crop(self, video: torch.Tensor) -> torch.Tensor:
        """``(..., H, W)`` at the working size -> the output size."""
        return video[..., : self.output[0], : self.output[1]]


def plan_geometry(height: int, width: int, resolution: int | None, multiple: int) -> Geometry:
    """The output and working sizes of a ``height`` x ``width`` source (pixels): longest side
    ``resolution`` (None: the source's own size), aspect kept to the nearest even pixel."""
    if resolution is not None and resolution < 8:
        raise InferError(f"resolution must be at least 8 pixels, got {resolution}")
    if multiple < 1:
        raise InferError(f"size_multiple must be >= 1, got {multiple}")
    scale = 1.0 if resolution is None else resolution / max(height, width)
    output = tuple(max(2, 2 * round(side * scale / 2)) for side in (height, width))
    working = tuple(math.ceil(side / multiple) * multiple for side in output)
    return Geometry(output, working)


def checkpoint_kind_of(cfg: DictConfig) -> str:
    """What ``cfg.checkpoint`` is, from its header: ``gen1-release``, ``gen1-lightning`` or
    ``sd`` (``model.sd.files.checkpoint_kind``); a missing or foreign file is one line."""
    if OmegaConf.is_missing(cfg, "checkpoint") or cfg.checkpoint in (None, ""):
        raise InferError("checkpoint=FILE is required (a Gen-1 release or .ckpt, or an SD file)")
    if not Path(cfg.checkpoint).is_file():
        raise InferError(f"checkpoint not found: {cfg.checkpoint}")
    return checkpoint_kind(cfg.checkpoint)


def resolution(cfg: DictConfig, kind: str) -> int | None:
    """The longest working side: a number, the checkpoint's native one, or None (the source's)."""
    if cfg.resolution == "native":
        if kind == "sd":
            return peek_config(cfg.checkpoint, cfg.sd.config).native_resolution or 512
        return native_resolution(cfg.checkpoint)
    if cfg.resolution == "source":
        return None
    if not isinstance(cfg.resolution, int):
        raise InferError(f"resolution must be native, source or a number, got {cfg.resolution!r}")
    return cfg.resolution


def frame_indices(source: SourceVideo, start: int, end, stride: int, max_frames) -> list[int]:
    """Source frames ``start, start + stride, ...`` before ``end``, at most ``max_frames``."""
    total = source.num_frames
    end = total if end is None else end
    if stride < 1:
        raise InferError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise InferError(f"max_frames must be >= 1, got {max_frames}")
    if 0 <= start < total and end <= start:
        raise InferError(
            f"frame range start={start} end={end} is reversed (or empty): end must be after "
            f"start (the input has {total} frames)"
        )
    if not (0 <= start < end <= total):
        raise InferError(
            f"frame range start={start} end={end} is outside {source.path}, which has "
            f"{total} frames (0 <= start < end <= {total})"
        )
    return list(range(start, end, stride))[:max_frames]


def check_request(cfg: DictConfig, kind: str) -> None:
    """Required keys, one content source (Gen-1: an image, a frame or a prompt; SD: a prompt),
    the prompt's prior, the method's name, the output path."""
    for key in ("input", "output", "checkpoint"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise InferError(
                f"{key}=... is required (python infer.py input=IN.mp4 output=OUT.mp4 "
                "checkpoint=FILE reference=IMAGE)"
            )
    if cfg.method is not None:
        unknown = [m for m in str(cfg.method).split("+") if m.strip() not in method_names()]
        if unknown:
            raise InferError(f"unknown method {unknown[0]!r}; known: {', '.join(method_names())}")
        try:
            get_method(str(cfg.method)).check(edit_settings(cfg), None, cfg.mask is not None)
        except ValueError as err:
            raise InferError(str(err)) from err
    if kind == "sd":
        check_text_request(cfg)
    else:
        check_gen1_content(cfg)
    check_paths_and_precision(cfg)
    check_window_mode(cfg)
    feather = cfg.get("mask_feather", 0)
    if isinstance(feather, bool) or not isinstance(feather, int | float) or feather < 0:
        raise InferError(f"mask_feather must be a number of pixels >= 0, got {feather!r}")


def check_window_mode(cfg: DictConfig) -> None:
    """``window.mode`` blend, sequential or fifo; the anchors of a sequential or fifo edit,
    whole frame numbers that leave room for new frames in every window; a fifo edit's
    sampler, method and ``frames_per_level``."""
    window = cfg.window
    mode = window.get("mode", "blend")
    if mode not in ("blend", "sequential", "fifo"):
        raise InferError(f"window.mode must be blend, sequential or fifo, got {mode!r}")
    if mode == "blend":
        return
    anchors = window.get("anchors", [0])
    if isinstance(anchors, str) or not all(isinstance(a, int) and a >= 0 for a in anchors):
        raise InferError(f"window.anchors must be a list of frame numbers, got {anchors}")
    if mode == "fifo":
        try:
            check_fifo_settings(edit_settings(cfg))
            frames_per_level(fifo_room(window.length, anchors), window.get("frames_per_level"))
        except ValueError as err:
            raise InferError(str(err)) from err
        return
    hold = window.get("hold", 0.25)
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= 1:
        raise InferError(f"window.hold must be a number in [0, 1], got {hold!r}")
    try:
        long_windows(window.length + 1, window.length, window.overlap, list(anchors))
    except ValueError as err:
        raise InferError(f"window.mode=sequential: {err}") from err


def check_paths_and_precision(cfg: DictConfig) -> None:
    """The output is an .mp4 that is not the input; the precision is one we know."""
    inp, out = Path(cfg.input), Path(cfg.output)
    if out.suffix.lower() != ".mp4":
        raise InferError(f"output must be an .mp4 file, got {out}")
    if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and out.samefile(inp)):
        raise InferError(f"output {out} is the input: the input is never overwritten")
    if cfg.precision not in ("auto", *DTYPES):
        raise InferError(f"precision must be auto, fp32, fp16 or bf16, got {cfg.precision!r}")


def check_gen1_content(cfg: DictConfig) -> None:
    """A Gen-1 checkpoint's content: exactly one of a reference image, a frame of the input or a
    prompt (none: ``default_reference``); a prompt through the prior needs the prior."""
    given = [k for k in ("reference", "prompt", "reference_frame") if cfg[k] is not None]
    if not given and cfg.get("default_reference") is not None:
        with open_dict(cfg):  # recorded in the sidecar as the reference it was
            cfg.reference = cfg.default_reference
        given = ["reference"]
    if len(given) != 1:
        raise InferError(
            "give exactly one content source: reference=IMAGE, prompt=TEXT or reference_frame=K"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if cfg.prompt is not None:
        if cfg.prompt_mode not in ("prior", "direct"):
            raise InferError(f"prompt_mode must be 'prior' or 'direct', got {cfg.prompt_mode!r}")
        if cfg.prompt_mode == "prior" and cfg.prior is None:
            raise InferError(
                "prompt=... with prompt_mode=prior needs a text-to-image-embedding prior, and "
                "none is configured: set prior=FILE (release.py CKPT OUT --component prior), "
                "use reference=IMAGE, or prompt_mode=direct for the CLIP text embedding as is"
            )
        if cfg.prompt_mode == "prior" and not Path(cfg.prior).is_file():
            raise InferError(f"prior={cfg.prior}: no such prior file")


def check_text_request(cfg: DictConfig) -> None:
    """An SD checkpoint is conditioned on text: a prompt, no image content."""
    images = [k for k in ("reference", "reference_frame") if cfg[k] is not None]
    if images:
        raise InferError(
            f"{cfg.checkpoint} is a Stable Diffusion checkpoint, conditioned on text: give "
            f"prompt=TEXT (and negative_prompt=TEXT), not {' / '.join(images)}"
        )
    if cfg.prompt is None:
        raise InferError(
            f"{cfg.checkpoint} is a Stable Diffusion checkpoint: give prompt=TEXT "
            "(and negative_prompt=TEXT)"
        )


def edit_settings(cfg: DictConfig) -> EditSettings:
    """The sampling settings of the config (an unresolved ``noise_correlation`` as 0; a fifo
    edit, which has no windows to overlap, with ``window_overlap`` 0)."""
    extra = {"window_overlap": 0} if cfg.window.get("mode") == "fifo" else {}
    return settings_from_config(cfg, noise_correlation=cfg.noise_correlation or 0.0, **extra)


def resolve_checkpoint_defaults(cfg: DictConfig, kind: str) -> None:
    """Settings left null take a Gen-1 checkpoint's own ``sampling`` defaults (else the
    stock; an SD file carries none)."""
    if cfg.noise_correlation is None and kind != "sd":
        cfg.noise_correlation = default_noise_correlation(cfg.checkpoint)


def device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype | None]:
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.device == "auto"
        else torch.device(cfg.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"device={cfg.device}: no CUDA device is available")
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        raise InferError(
            f"precision=bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
            "native bf16 (AVX512-BF16 or AMX) and emulates it, many times slower than fp32: "
            "use precision=fp32"
        )
    return device, DTYPES[precision]
