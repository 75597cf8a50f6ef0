"""The main job: edit held-out clips of the procedural world with the bundled tiny models.

Runs ``infer.py`` on each bundled sample clip (``bundle/tiny_world/samples/``, rendered from
the world's test split, which training never saw): with the tiny Gen-1, two edits take their
content from a reference image (a frame of another held-out clip) and one from a text prompt
through the bundled prior; with the tiny SD single file (``bundle/tiny_sd/``), one mov2mov
edit from a prompt, through exactly the path a real SD 1.5 file takes, the same edit with
the bundled tiny depth ControlNet, and one prompt without and with the bundled tiny LoRA
(``lora=[...]``); with the tiny Gen-1 again, one edit streamed through a queue at
staggered noise levels (``window.mode=fifo``: flat memory, no window seams) whose content
moves from one reference to another between keyframes. Writes the edited mp4s,
side-by-side previews (input | depth | output), JSON sidecars and ``overview.png`` (inputs
left, edits right, frames 0, 5, 10, 15) under ``outputs/demo/``.

``python demo.py --write-samples`` re-renders the sample clips and reference images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLE = Path("bundle/tiny_world")
SAMPLES = BUNDLE / "samples"
OUT = Path("outputs/demo")
NUM_FRAMES = 16

# (name, test-split clip, content): content is ("reference", test clip whose frame 0 is the
# reference image) or ("prompt", text).
EDITS = [
    ("clip_a", 3, ("reference", 16)),
    ("clip_b", 22, ("reference", 30)),
    (
        "clip_c",
        5,
        ("prompt", "a yellow dotted sphere and a blue sphere on a green checkered floor"),
    ),
]
# Edits with the tiny SD (mov2mov): (output name, sample clip, prompt, extra overrides).
SD_EDITS = [
    (
        "clip_a_sd",
        "clip_a",
        "a red striped sphere on a purple checkered floor",
        ["strength=0.75"],
    ),
    (  # the same edit with the bundled depth ControlNet: the input's structure kept
        "clip_a_sd_controlnet",
        "clip_a",
        "a red striped sphere on a purple checkered floor",
        [
            "strength=0.75",
            "controlnet=[{file: bundle/tiny_sd/tiny_controlnet_depth.safetensors, hint: depth}]",
            "midas.name=midas_tiny",
            "midas.weights=bundle/tiny_world/midas_tiny.safetensors",
        ],
    ),
    # the bundled LoRA (trained on 16 frames showing a pink sphere, captioned "a sks object"):
    # the same prompt without and with it
    ("clip_b_sd", "clip_b", "a sks object", ["strength=0.75", "steps=10"]),
    (
        "clip_b_sd_lora",
        "clip_b",
        "a sks object",
        [
            "strength=0.75",
            "steps=10",
            "lora=[{file: bundle/tiny_sd/tiny_lora_pink_sphere.safetensors}]",
        ],
    ),
]
TINY_SD = Path("bundle/tiny_sd/tiny_sd.safetensors")
# The Gen-1 model through the fifo queue (flat memory, no window seams), its content keyframed
# from clip_a's reference at frame 0 to clip_b's at frame 15: (output name, clip, overrides).
LONG_EDITS = [
    (
        "clip_a_keyframes",
        "clip_a",
        [
            "reference=bundle/tiny_world/samples/clip_a_ref.png",
            "window.mode=fifo",
            "keyframes=[{frame: 15, reference: bundle/tiny_world/samples/clip_b_ref.png}]",
        ],
    ),
]


def write_samples() -> None:
    """Render the sample clips (mp4) and reference images (png) from the world's test split."""
    from data.io import write_video
    from data.synthetic import SyntheticWorldDataset

    world = SyntheticWorldDataset(40, num_frames=NUM_FRAMES, size=64, split="test")
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name, index, (kind, value) in EDITS:
        clip = world[index]
        write_video(SAMPLES / f"{name}.mp4", clip["frames"], fps=8, crf=10)
        print(f"{SAMPLES / name}.mp4: {clip['caption']}")
        if kind == "reference":
            frame = world[value]["frames"][0]
            pixels = ((frame.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
            Image.fromarray(pixels.numpy().astype(np.uint8)).save(SAMPLES / f"{name}_ref.png")
            print(f"{SAMPLES / name}_ref.png: {world[value]['caption']}")


def run_infer(*overrides: str) -> None:
    print("$ python infer.py", " ".join(overrides), flush=True)
    subprocess.run([sys.executable, "infer.py", *overrides], check=True)


OVERVIEW_FRAMES = [0, 5, 10, 15]


def write_overview(path: Path, scale: int = 2, gap: int = 8) -> None:
    """One row per edit: the input's frames ``OVERVIEW_FRAMES`` left, the edit's right."""
    from data.media import read_frames

    pairs = [(name, name) for name, _, _ in EDITS]
    pairs += [(clip, name) for name, clip, _, _ in SD_EDITS]
    pairs += [(clip, name) for name, clip, _ in LONG_EDITS]
    rows = []
    for clip, name in pairs:
        halves = []
        for video in (SAMPLES / f"{clip}.mp4", OUT / f"{name}.mp4"):
            frames = read_frames(video, OVERVIEW_FRAMES, (64, 64))[0]  # (F, 3, H, W) in [-1, 1]
            strip = ((frames.permute(2, 0, 3, 1) + 1) * 127.5).round().clamp(0, 255)
            halves.append(strip.reshape(64, -1, 3).numpy().astype(np.uint8))
        space = np.full((64, gap // scale, 3), 255, np.uint8)
        rows.append(np.concatenate([halves[0], space, halves[1]], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(grid).save(path)


def report(name: str) -> None:
    """One line per edit: its frames, method, time and files."""
    sidecar = json.loads((OUT / f"{name}.json").read_text())
    print(
        f"demo: {name}: {sidecar['frames']['count']} frames edited ({sidecar['method']}) in "
        f"{sidecar['timing']['edit_s']:.1f} s -> {OUT / name}.mp4, {OUT / name}.preview.mp4"
    )


def main() -> None:
    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, _, (kind, value) in EDITS:
        content = (
            f"reference={SAMPLES / name}_ref.png" if kind == "reference" else f"prompt='{value}'"
        )
        run_infer(
            f"input={SAMPLES / name}.mp4",
            f"output={OUT / name}.mp4",
            content,
            "preview=true",
            "progress=false",
            "seed=0",
        )
        report(name)
    for name, clip, prompt, extra in SD_EDITS:
        run_infer(
            f"input={SAMPLES / clip}.mp4",
            f"output={OUT / name}.mp4",
            f"checkpoint={TINY_SD}",
            f"prompt='{prompt}'",
            "preview=true",
            "progress=false",
            "seed=0",
            *extra,
        )
        report(name)
    for name, clip, extra in LONG_EDITS:
        run_infer(
            f"input={SAMPLES / clip}.mp4",
            f"output={OUT / name}.mp4",
            "preview=true",
            "progress=false",
            "seed=0",
            *extra,
        )
        report(name)
    write_overview(OUT / "overview.png")
    print(f"demo: done in {time.perf_counter() - started:.0f} s; outputs in {OUT}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-samples", action="store_true", help=write_samples.__doc__)
    if parser.parse_args().write_samples:
        write_samples()
    else:
        main()
