"""A LoRA of the tiny SD trained on a few frames of one object's look moves edits toward it.

``python bench/tiny_lora.py images DIR [--crop]``: writes the training images, the first
frame of the first ``--images`` training-split world clips whose caption has ``--look`` ("a
pink sphere"; ``--crop``: the square around that object, object-centred as DreamBooth's
subject images are); then ``python train.py experiment=tiny_lora data.root=DIR`` trains the
LoRA (every image captioned with the instance prompt "a sks object").

``python bench/tiny_lora.py score LORA``: ``--clips`` held-out test-split clips (8 frames)
are edited by mov2mov from the instance prompt (strength 0.75, 20 DPM++ 2M steps, w 7.5,
one seed per clip), with and without the LoRA; scored by the bundled tiny CLIP as (a) Gen-1's
prompt consistency with the look's words and (b) the cosine of the edit's frames with the
mean CLIP image embedding of the training images (``--crop`` as they were written). Prints
a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import summary  # noqa: E402
from data.synthetic import SyntheticWorldDataset  # noqa: E402
from data.world_render import render  # noqa: E402
from model.editing.pipeline import edit_video  # noqa: E402
from model.editing.settings import EditSettings  # noqa: E402
from model.encoders.clip import load_clip  # noqa: E402
from model.metrics.video import prompt_consistency  # noqa: E402
from model.sd.loading import load_sd  # noqa: E402
from model.sd.lora import merge_loras  # noqa: E402

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "clip_tiny.safetensors"


def look_frames(look: str, count: int, crop: bool = False) -> list[torch.Tensor]:
    """First frames ``(3, 64, 64)`` in [-1, 1] of the first ``count`` training clips with
    ``look`` in their caption; ``crop``: instead the square around the object (its extent
    x 1.5, at least 16 pixels of the frame rendered at 128, resized to 64)."""
    world = SyntheticWorldDataset(num_clips=4000, num_frames=1, size=64, split="train")
    frames = []
    for i in range(len(world)):
        if look not in world[i]["caption"]:
            continue
        frames.append(object_crop(world.scene(i), look) if crop else world[i]["frames"][0])
        if len(frames) == count:
            return frames
    raise ValueError(f"only {len(frames)} training clips show {look!r}")


def object_crop(scene, look: str, size: int = 128) -> torch.Tensor:
    """The square ``(3, 64, 64)`` around the first body of ``scene`` that ``look`` ("a pink
    sphere") names, from its first frame rendered at ``size``."""
    colour, shape = look.split()[-2:]
    bodies = enumerate(scene.bodies)
    index = next(k for k, b in bodies if b.shape == shape and b.material.describe() == colour)
    clip = render(scene, 1, (size, size))
    ys, xs = torch.nonzero(clip.surface[0] == index + 1, as_tuple=True)
    centre_y, centre_x = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(8.0, 0.75 * float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1))
    half = min(half, size / 2)
    top = int(min(max(centre_y - half, 0), size - 2 * half))
    left = int(min(max(centre_x - half, 0), size - 2 * half))
    side = int(2 * half)
    square = clip.frames[0, :, top : top + side, left : left + side]
    return torch.nn.functional.interpolate(
        square[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(-1, 1)


def write_images(folder: Path, look: str, count: int, crop: bool = False) -> None:
    """Write ``look_frames(look, count, crop)`` to ``folder`` as ``00.png``, ``01.png`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(look_frames(look, count, crop)):
        pixels = ((frame.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
        Image.fromarray(pixels.numpy().astype(np.uint8)).save(folder / f"{i:02d}.png")
    print(f"wrote {count} images of {look!r} to {folder}")


@torch.no_grad()
def score(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model = load_sd(TINY_SD)
    clip = load_clip(CLIP, "clip_tiny")
    target = torch.stack(look_frames(args.look, args.images, args.crop))
    mean = torch.nn.functional.normalize(clip.encode_image(target).float().mean(0), dim=-1)
    world = SyntheticWorldDataset(num_clips=args.clips, num_frames=8, split="test")
    settings = EditSettings(
        steps=args.steps, strength=args.strength, w=args.w, sampler="dpmpp_2m", method="mov2mov"
    )
    rows = []
    for i in range(args.clips):
        frames = world[i]["frames"][None]
        row = {"input_text": prompt_consistency(clip, frames[0], args.look)}
        for name, weight in (("without", 0.0), ("with", args.weight)):
            with merge_loras([(args.lora, weight)], model.unet, model.text_encoder):
                edited = edit_video(
                    model,
                    frames,
                    model.encode_prompt(args.prompt),
                    settings,
                    generator=torch.Generator().manual_seed(i),
                ).frames[0]
            image = torch.nn.functional.normalize(clip.encode_image(edited).float(), dim=-1)
            row[f"{name}_text"] = prompt_consistency(clip, edited, args.look)
            row[f"{name}_image"] = float((image @ mean).mean())
        rows.append(row)
        print(f"clip {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    mean_of = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    print(
        f"\nmov2mov from {args.prompt!r}, {args.clips} test clips x 8 frames, {args.steps} "
        f"DPM++ 2M steps, strength {args.strength}, w {args.w}; LoRA weight {args.weight}\n"
    )
    print(
        f"| | CLIP: prompt consistency with {args.look!r} | CLIP: cosine with the training images |"
    )
    print("|---|---|---|")
    m = mean_of
    print(f"| edit without the LoRA | {m['without_text']:.4f} | {m['without_image']:.4f} |")
    print(f"| **edit with the LoRA** | **{m['with_text']:.4f}** | **{m['with_image']:.4f}** |")
    for kind in ("text", "image"):
        gain = [r[f"with_{kind}"] - r[f"without_{kind}"] for r in rows]
        spread = statistics.stdev(gain) / len(gain) ** 0.5 if len(gain) > 1 else 0.0
        print(
            f"{kind}: with - without {statistics.mean(gain):+.4f} (standard error {spread:.4f}), "
            f"higher on {sum(g > 0 for g in gain)} of {len(gain)} clips"
        )
    print(f"input clips, prompt consistency with the look: {mean_of['input_text']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("command", choices=("images", "score"))
    parser.add_argument("path", help="images: the folder to write; score: the LoRA file")
    parser.add_argument("--look", default="a pink sphere")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument(
        "--crop", action="store_true", help="the training images are the squares around the object"
    )
    parser.add_argument("--prompt", default="a sks object")
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--w", type=float, default=7.5)
    parser.add_argument("--weight", type=float, default=1.0)
    args = parser.parse_args()
    if args.command == "images":
        write_images(Path(args.path), args.look, args.images, args.crop)
    else:
        args.lora = Path(args.path)
        score(args)


if __name__ == "__main__":
    main()
