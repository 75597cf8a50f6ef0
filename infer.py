"""Edit a video with a Gen-1 model:
``python infer.py input=IN.mp4 output=OUT.mp4 checkpoint=FILE reference=IMAGE [key=value ...]``.

Composes ``configs/infer.yaml``; checks every input before the model is loaded (the audio's
fate included); reads the chosen frames upright at the working resolution; edits them
(``model.editing``); writes an H.264 mp4 at the source fps (over the stride) or, for a
variable-rate source, at the frames' source times, with the audio of exactly the kept span
(as AAC), an optional side-by-side preview and a JSON sidecar of every setting. Outputs are
written to temporary files and moved into place; the input is never overwritten. A bad input
ends the run with one line on stderr and exit status 1, leaving no output behind.
"""

from __future__ import annotations

import json
import platform
import secrets
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import decord
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data.audio import AudioTrack
from data.io import FrameTimes, write_video
from data.media import (
    MediaError,
    SourceVideo,
    output_timing,
    probe_video,
    read_audio,
    read_depth,
    read_frames,
    read_image,
    read_mask,
)
from model.editing.content import image_content, text_content
from model.editing.pipeline import edit_video
from model.editing.precision import autocast, cast_for_inference
from model.editing.settings import (
    EditSettings,
    check_settings,
    settings_from_config,
    temporal_frame_limit,
)
from model.encoders.prior import load_prior, prior_function
from model.training.gen1 import build_depth
from model.training.loading import load_gen1
from model.weights.atomic import atomic_output, file_sha256
from model.weights.checkpoint import CheckpointError
from model.weights.release import default_noise_correlation, is_release, native_resolution

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class InferError(Exception):
    """A bad input or setting, reported to the user as one line."""


def working_size(height: int, width: int, resolution: int | None, multiple: int):
    """(H, W): longest side ``resolution`` (or the source's), aspect kept, both rounded to a
    multiple of ``multiple``."""
    if resolution is not None and (resolution < multiple or resolution % multiple):
        raise InferError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    scale = 1.0 if resolution is None else resolution / max(height, width)
    return tuple(
        max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)
    )


def resolution(cfg: DictConfig) -> int | None:
    """The longest working side: a number, the checkpoint's native one, or None (the source's)."""
    if cfg.resolution == "native":
        if not Path(cfg.checkpoint).is_file():
            raise InferError(f"checkpoint not found: {cfg.checkpoint}")
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
    if not (0 <= start < end <= total):
        raise InferError(
            f"frame range start={start} end={end} is outside {source.path}, which has "
            f"{total} frames (0 <= start < end <= {total})"
        )
    return list(range(start, end, stride))[:max_frames]


def check_request(cfg: DictConfig) -> None:
    """Required keys, one content source, the prompt's prior, the output path."""
    for key in ("input", "output", "checkpoint"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise InferError(
                f"{key}=... is required (python infer.py input=IN.mp4 output=OUT.mp4 "
                "checkpoint=FILE reference=IMAGE)"
            )
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
    inp, out = Path(cfg.input), Path(cfg.output)
    if out.suffix.lower() != ".mp4":
        raise InferError(f"output must be an .mp4 file, got {out}")
    if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and out.samefile(inp)):
        raise InferError(f"output {out} is the input: the input is never overwritten")
    if cfg.precision not in ("auto", *DTYPES):
        raise InferError(f"precision must be auto, fp32, fp16 or bf16, got {cfg.precision!r}")


def edit_settings(cfg: DictConfig) -> EditSettings:
    """The sampling settings of the config (an unresolved ``noise_correlation`` as 0)."""
    return settings_from_config(cfg, noise_correlation=cfg.noise_correlation or 0.0)


def resolve_checkpoint_defaults(cfg: DictConfig) -> None:
    """Settings left null take the checkpoint's own ``sampling`` defaults (else the stock)."""
    if cfg.noise_correlation is None and Path(cfg.checkpoint).is_file():
        cfg.noise_correlation = default_noise_correlation(cfg.checkpoint)


def _device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype | None]:
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
    return device, DTYPES[precision]


@contextmanager
def staged_outputs(paths: list[Path]):
    """Temporary files beside ``paths`` (same suffix); moved into place only on success."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]


@dataclass
class Inputs:
    """Everything read from disk before the model is loaded."""

    source: SourceVideo
    size: tuple[int, int]  # working (H, W)
    indices: list[int]  # source frames used
    frames: torch.Tensor  # (1, F, 3, H, W) in [-1, 1]
    reference: np.ndarray | None  # reference image (H, W, 3) uint8
    mask: torch.Tensor | None  # (1, F or 1, 1, H, W) in [0, 1]
    depth: torch.Tensor | None  # (1, F, 1, H, W)
    times: FrameTimes  # when each output frame shows
    timing: str  # "constant rate" or "source timestamps"
    audio: AudioTrack  # the kept span's audio, ready to mux (or why there is none)


def read_inputs(cfg: DictConfig) -> Inputs:
    """Check the request and read every input file; any problem is an InferError."""
    check_request(cfg)
    try:
        check_settings(edit_settings(cfg))
    except ValueError as err:
        raise InferError(str(err)) from err
    source = probe_video(cfg.input)
    size = working_size(source.height, source.width, resolution(cfg), cfg.size_multiple)
    indices = frame_indices(source, cfg.start, cfg.end, cfg.stride, cfg.max_frames)
    times, span_s, timing = output_timing(source, indices, cfg.stride)
    if cfg.reference_frame is not None and not 0 <= cfg.reference_frame < source.num_frames:
        raise InferError(
            f"reference_frame={cfg.reference_frame} is outside the input's "
            f"{source.num_frames} frames"
        )
    return Inputs(
        source=source,
        size=size,
        indices=indices,
        frames=read_frames(source, indices, size),
        reference=read_image(cfg.reference) if cfg.reference is not None else None,
        mask=read_mask(cfg.mask, source, indices, size) if cfg.mask is not None else None,
        depth=read_depth(cfg.depth, source, indices, size) if cfg.depth is not None else None,
        times=times,
        timing=timing,
        audio=read_audio(source, span_s),  # cut and encoded now: writing cannot fail on it
    )


def load_model(cfg: DictConfig, inputs: Inputs, device, dtype):
    """The Gen1 of ``cfg.checkpoint`` and the MiDaS to use (None: the model's or given depth),
    on ``device``, weights cast to ``dtype`` (None keeps float32)."""
    gen1 = load_gen1(cfg.checkpoint, use_ema=cfg.use_ema).to(device)
    estimator = build_depth(OmegaConf.to_container(cfg.midas)) if cfg.midas.name else None
    no_depth = inputs.depth is None and estimator is None and gen1.depth is None
    if gen1.structure_channels and no_depth:
        raise InferError(
            f"{cfg.checkpoint} has no depth model: give depth=FILE (a depth video or "
            ".npy) or midas.name=NAME midas.weights=FILE"
        )
    estimator = estimator.to(device) if estimator is not None else None
    if dtype is not None:
        for module in (gen1, estimator):
            if module is not None:
                cast_for_inference(module, dtype)
    try:
        check_settings(edit_settings(cfg), temporal_frame_limit(gen1.unet))
    except ValueError as err:
        raise InferError(str(err)) from err
    return gen1, estimator


def prompt_prior(cfg: DictConfig, embed_dim: int, device, seed: int):
    """The callable ``text_content`` takes: the prior of ``cfg.prior``, sampled from ``seed``
    (two candidates, the one nearer the text kept, as DALL-E 2 does)."""
    try:
        prior = load_prior(cfg.prior)
    except CheckpointError as err:
        raise InferError(str(err)) from err
    if prior.embed_dim != embed_dim:
        raise InferError(
            f"prior={cfg.prior} maps {prior.embed_dim}-d CLIP embeddings, but the model's "
            f"CLIP has {embed_dim}: the prior belongs to another CLIP"
        )
    return prior_function(prior.to(device), seed=seed, num_candidates=2)


def content_embedding(
    cfg: DictConfig, gen1, inputs: Inputs, device, dtype, seed: int = 0
) -> torch.Tensor:
    """Content ``(1, 1, D)`` of the reference image, the reference frame or the prompt."""
    with autocast(device, dtype):
        if inputs.reference is not None:
            image = torch.from_numpy(inputs.reference.copy()).permute(2, 0, 1)
            return image_content(gen1, image[None].float() / 127.5 - 1)
        if cfg.reference_frame is not None:
            frame = read_frames(inputs.source, [cfg.reference_frame], inputs.size)
            return image_content(gen1, frame[0])
        prior = None
        if cfg.prompt_mode == "prior":
            prior = prompt_prior(cfg, gen1.clip.embed_dim, device, seed)
        return text_content(gen1, cfg.prompt, cfg.prompt_mode, prior=prior)


def write_outputs(cfg: DictConfig, inputs: Inputs, result, sidecar: dict, started: float):
    """The mp4 (with the kept span's audio), the preview and the sidecar (its timing
    completed here), staged in temporary files and moved into place together."""
    output = Path(cfg.output)
    paths = [output.with_suffix(".json"), output]
    if cfg.preview:
        paths.append(output.with_name(output.stem + ".preview.mp4"))
    fps = sidecar["frames"]["fps"]
    with staged_outputs(paths) as temps:
        write_video(
            temps[1], result.frames[0], fps, crf=cfg.crf, times=inputs.times, audio=inputs.audio
        )
        if cfg.preview:
            frames = inputs.frames[0]
            depth = result.depth[0] if result.depth is not None else torch.zeros_like(frames)
            panels = [frames, depth.expand(-1, 3, -1, -1), result.frames[0]]
            write_video(temps[2], torch.cat(panels, dim=-1), fps, crf=cfg.crf, times=inputs.times)
        timing = sidecar["timing"]
        timing["write_s"] = time.perf_counter() - started - sum(timing.values())
        timing["total_s"] = time.perf_counter() - started
        temps[0].write_text(json.dumps(sidecar, indent=2) + "\n")


def describe(cfg: DictConfig, inputs: Inputs, result, seed: int, gen1, device, dtype) -> dict:
    """The sidecar: every resolved setting, the seed, the checkpoint's sha256, frames, sizes."""
    source, times = inputs.source, inputs.times
    return {
        "input": str(Path(cfg.input).resolve()),
        "output": str(Path(cfg.output).resolve()),
        "checkpoint": {
            "path": str(Path(cfg.checkpoint).resolve()),
            "sha256": file_sha256(cfg.checkpoint),
            "format": "release" if is_release(cfg.checkpoint) else "lightning",
        },
        "seed": seed,
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "edit": asdict(edit_settings(cfg)),
        "source": source.summary(),
        "frames": {
            "indices": inputs.indices,
            "count": len(inputs.indices),
            "fps": source.fps / cfg.stride,
            "timing": inputs.timing,
            "times_s": [float(p * times.time_base) for p in times.pts],
            "duration_s": times.duration_s,
        },
        "rotation": source.rotation,  # degrees clockwise applied on reading (then mirrored)
        "size": {
            "output": list(inputs.size),
            "latent": [s // gen1.vae.downsample_factor for s in inputs.size],
        },
        "windows": result.windows,
        "audio": inputs.audio.description,
        "audio_span_s": list(inputs.audio.span_s) if inputs.audio.span_s else None,
        "device": str(device),
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "av": av.__version__,
            "decord": decord.__version__,
        },
    }


def run(cfg: DictConfig) -> dict:
    """Edit ``cfg.input`` into ``cfg.output``; returns the sidecar dict plus ``result``."""
    clock = [time.perf_counter()]
    resolve_checkpoint_defaults(cfg)
    inputs = read_inputs(cfg)
    clock.append(time.perf_counter())
    device, dtype = _device_and_dtype(cfg)
    gen1, estimator = load_model(cfg, inputs, device, dtype)
    clock.append(time.perf_counter())
    seed = int(cfg.seed) if cfg.seed is not None else secrets.randbelow(2**31)
    result = edit_video(
        gen1,
        inputs.frames,
        content_embedding(cfg, gen1, inputs, device, dtype, seed),
        edit_settings(cfg),
        depth=inputs.depth,
        depth_estimator=estimator,
        mask=inputs.mask,
        generator=torch.Generator().manual_seed(seed),
        autocast_dtype=dtype,
        progress=cfg.progress,
    )
    clock.append(time.perf_counter())
    sidecar = describe(cfg, inputs, result, seed, gen1, device, dtype)
    phases = ("read_s", "load_s", "edit_s")
    sidecar["timing"] = {k: b - a for k, a, b in zip(phases, clock[:-1], clock[1:], strict=True)}
    write_outputs(cfg, inputs, result, sidecar, clock[0])
    return {**sidecar, "result": result}


def cli(cfg: DictConfig) -> int:
    """Run; a bad input or checkpoint is one line on stderr and exit status 1."""
    try:
        outcome = run(cfg)
    except (InferError, MediaError, CheckpointError, FileNotFoundError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {cfg.output}: {outcome['frames']['count']} frames, "
        f"{outcome['size']['output'][1]}x{outcome['size']['output'][0]}, "
        f"{outcome['frames']['fps']:g} fps ({outcome['frames']['timing']}), "
        f"seed {outcome['seed']}, audio {outcome['audio']}"
    )
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    code = cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
