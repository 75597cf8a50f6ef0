"""Where an edit's time goes: ``python bench/infer.py --profile``.

Runs infer.py's steps (``jobs.editing``: read and decode the media, CLIP content, the edit,
H.264 encode and mux) on the bundled clip with the bundled tiny world model, and on the same
clip at 512x512 x ``--frames`` (8) frames with an SD 1.5-sized Gen-1 of random weights
(SD 1.5 UNet and VAE, MiDaS DPT-Hybrid, CLIP ViT-L/14), each in a fresh process at the
machine's default thread count (wall time, what a user waits) or at ``--threads`` (on one,
process CPU time: steady on a shared machine). Network time is taken by forward hooks on
MiDaS, CLIP's image tower, the VAE's encoder and decoder and the UNet; the edit runs with an
all-ones mask, so the VAE encoder (used by SDEdit and masked edits) is timed too. The UNet's
first call holds ``prepack=auto``'s calibration when the cache is cold (``--cold``: a fresh
one): a step is timed on the later calls, the first call's extra shown apart.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import machine_line, print_table, run_worker

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "bundled": "bundled clip, tiny world model",
    "sd15": "SD 1.5-sized, random weights, 512x512",
}
STAGES = ["media decode", "CLIP", "MiDaS", "VAE encode", "UNet per step", "VAE decode"]
STAGES += ["encode/mux", "other (structure, sampler, windows)"]


class Stopwatch:
    """Seconds of each module's forward calls, by forward hooks."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.handles = []

    def watch(self, name: str, module: torch.nn.Module | None) -> None:
        if module is None:
            return
        started = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: started.append(now())))
        self.handles.append(
            module.register_forward_hook(
                lambda m, a, out: self.calls[name].append(now() - started.pop())
            )
        )

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, []))


CLOCK = [time.perf_counter]  # process CPU time on one thread (steady on a shared machine)


def now() -> float:
    return CLOCK[0]()


def config(case: str, output: Path, frames: int = 8):
    from hydra import compose, initialize_config_dir

    overrides = [f"output={output}", "progress=false", "seed=0"]
    if case == "sd15":
        # one step: the UNet's calls after its first (calibrating) one give a step's time
        overrides += ["resolution=512", f"max_frames={frames}", "steps=1"]
        overrides += [f"window.length={frames}", "window.overlap=0"]  # one window
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=overrides)


def sd15_gen1():
    """Gen-1 on SD 1.5's UNet and VAE with MiDaS DPT-Hybrid and CLIP ViT-L/14, all random."""
    from hydra import compose, initialize_config_dir

    from jobs.training import build_model

    overrides = ["run_dir=unused", "model=sd15", "model.ema_decay=null"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def worker(case: str, cold: bool, frames: int = 8, threads: int = 0) -> dict:
    """One edit of ``case`` on ``threads`` threads (0: the machine's default; 1: timed in
    process CPU time), its stages timed; seconds per frame, and the calibration lines."""
    if threads:
        torch.set_num_threads(threads)
    if threads == 1:
        CLOCK[0] = time.process_time
    from jobs.editing.inputs import read_inputs
    from jobs.editing.models import content_embedding, load_model
    from jobs.editing.outputs import describe, output_files
    from jobs.editing.request import (
        checkpoint_kind_of,
        device_and_dtype,
        edit_settings,
        resolve_checkpoint_defaults,
    )
    from model.editing.pipeline import edit_video

    scratch = Path(tempfile.mkdtemp())
    if cold:
        os.environ["GEN1_CACHE_DIR"] = str(scratch / "cache")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("model.weights.calibration").addHandler(handler)
    logging.getLogger("model.weights.calibration").setLevel(logging.INFO)

    cfg = config(case, scratch / "edited.mp4", frames)
    kind = checkpoint_kind_of(cfg)
    resolve_checkpoint_defaults(cfg, kind)
    start = now()
    inputs = read_inputs(cfg, kind)
    decode_s = now() - start
    device, dtype = device_and_dtype(cfg)
    if case == "sd15":
        gen1, estimator = sd15_gen1(), None
    else:
        gen1, estimator = load_model(cfg, inputs, device, dtype, kind)
    watch = Stopwatch()
    watch.watch("MiDaS", estimator if estimator is not None else gen1.depth)
    watch.watch("CLIP", gen1.clip.model.visual)
    watch.watch("VAE encode", gen1.vae.encoder)
    watch.watch("VAE decode", gen1.vae.decoder)
    watch.watch("UNet", gen1.sampling_unet())
    content = content_embedding(cfg, gen1, inputs, device, dtype, kind)
    frames = inputs.frames
    mask = torch.ones(1, 1, 1, *frames.shape[-2:])  # the edit everywhere, the encoder run
    start = now()
    result = edit_video(
        gen1, frames, content, edit_settings(cfg), depth=inputs.depth, depth_estimator=estimator,
        mask=mask, generator=torch.Generator().manual_seed(0), autocast_dtype=dtype,
    )  # fmt: skip
    edit_s = now() - start
    sidecar = describe(cfg, inputs, result, 0, gen1, device, dtype, kind)
    sidecar["timing"] = {}
    start = now()
    with output_files(cfg, inputs, time.perf_counter()) as outputs:  # as infer.py writes
        outputs.add(
            result.frames[0],
            inputs.frames[0],
            result.depth[0] if result.depth is not None else None,
        )
        outputs.sidecar = sidecar
    mux_s = now() - start

    unet = watch.calls["UNet"]
    calls_per_step = len(unet) // result.steps_run
    steady = statistics.median(unet[1:]) if len(unet) > 1 else unet[0]
    first_extra = max(unet[0] - steady, 0.0) if len(unet) > 1 else 0.0
    networks = sum(watch.total(k) for k in ("MiDaS", "VAE encode", "VAE decode", "UNet"))
    seconds = {
        "media decode": decode_s,
        "CLIP": watch.total("CLIP"),
        "MiDaS": watch.total("MiDaS"),
        "VAE encode": watch.total("VAE encode"),
        "UNet per step": steady * calls_per_step,
        "VAE decode": watch.total("VAE decode"),
        "encode/mux": mux_s,
        "other (structure, sampler, windows)": edit_s - networks,
    }
    num_frames = frames.shape[1]
    return {
        "per_frame": {k: v / num_frames for k, v in seconds.items()},
        "frames": num_frames,
        "size": list(frames.shape[-2:]),
        "steps": cfg.steps,
        "unet_calls_per_step": calls_per_step,
        "unet_first_call_extra_s": first_extra,
        "edit_s": edit_s,
        "threads": torch.get_num_threads(),
        "calibration": lines,
    }


def profile(cold: bool, cases: list[str], frames: int = 8, threads: int = 0) -> None:
    """Print the table of seconds per frame of each stage, for each case."""
    print(machine_line([threads] if threads else None))
    script = str(ROOT / "bench" / "infer.py")
    results = {}
    for case in cases:
        results[case] = run_worker(
            script, ["profile", case, str(int(cold)), str(frames), str(threads)]
        )
        print(json.dumps({"case": case, **results[case]}), flush=True)  # as it comes
    rows = []
    for stage in STAGES:
        row = {"stage (s per frame)": stage}
        row |= {CASES[c]: f"{r['per_frame'][stage]:.4g}" for c, r in results.items()}
        rows.append(row)
    total = {"stage (s per frame)": "edit at its steps (UNet x steps, rest once)"}
    for case, r in results.items():
        steps = r["steps"] if case != "sd15" else 20
        per_frame = r["per_frame"]
        rest = sum(v for k, v in per_frame.items() if k != "UNet per step")
        total[CASES[case]] = f"{rest + steps * per_frame['UNet per step']:.4g}"
    rows.append(total)
    print_table(rows, list(rows[0]))
    for case, r in results.items():
        print(
            f"{CASES[case]}: {r['frames']} frames at {r['size'][1]}x{r['size'][0]}, "
            f"{r['unet_calls_per_step']} UNet call(s) per step, {r['threads']} threads; "
            f"UNet's first call +{r['unet_first_call_extra_s']:.1f} s"
        )
        for line in r["calibration"]:
            print("  " + line)
    if "sd15" in results:
        print("SD 1.5 edit total: 20 steps (1 run, the UNet's per-step time from its later calls)")
    print(machine_line())
