"""Make a release file from a training checkpoint:
``python release.py CHECKPOINT.ckpt OUT.safetensors [--no-ema] [--sampling KEY=VALUE ...]``,
``... --component NAME`` or ``... --format sd|controlnet|lora``.

The release holds the EMA UNet (the trained weights with ``--no-ema``) and the frozen parts,
in fp16, with the model's config as JSON metadata; ``infer.py checkpoint=OUT.safetensors``
loads it. ``--sampling`` sets the editing defaults it carries (``resolution``,
``noise_correlation``: what ``infer.py`` uses when they are left native or null).
``--component vae|depth|clip|prior`` instead exports the network a component trainer
(``experiment=tiny_vae`` ...) trained, in the file format its loader reads. ``--format sd``
writes the checkpoint of a text-to-image SD trainer (``experiment=tiny_sd``) as a single-file
SD checkpoint in the original key layout (fp16; the EMA UNet unless ``--no-ema``) with its
inference ``OUT.yaml`` beside it, as SD checkpoints ship; ``--format controlnet`` writes a
ControlNet trainer's (``experiment=tiny_controlnet``) ControlNet in the original layout
(``control_model.*``, fp16, EMA unless ``--no-ema``); ``--format lora`` writes a LoRA
trainer's (``experiment=tiny_lora``) LoRA in kohya's format (``lora_unet_*``, float32, as
A1111 / ComfyUI load; the base SD file the checkpoint names must be readable; LoRA training
keeps no EMA). Prints the file's sha256. Exit status 1 with one line on stderr on failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from model.training.loading import release_from_checkpoint
from model.weights.atomic import file_sha256
from model.weights.checkpoint import CheckpointError

SAMPLING_KEYS = {"resolution": int, "noise_correlation": float}  # editing defaults, and types

COMPONENTS = {
    "vae": ("model.training.components", "VAETrainer"),
    "depth": ("model.training.components", "DepthTrainer"),
    "clip": ("model.training.components", "ClipTrainer"),
    "prior": ("model.training.prior_training", "PriorTrainer"),
}


def export_component(checkpoint: str, output: str, component: str) -> str:
    """The trained network of a component trainer's checkpoint, exported; returns sha256."""
    module_name, class_name = COMPONENTS[component]
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    trainer_class = getattr(importlib.import_module(module_name), class_name)
    try:
        trainer = trainer_class.load_from_checkpoint(checkpoint, map_location="cpu")
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{checkpoint}: not a {class_name} checkpoint ({err})") from err
    trainer.export(output)
    return file_sha256(output)


def parse_sampling(pairs: list[str]) -> dict:
    """``["noise_correlation=1.0", ...]`` -> ``{"noise_correlation": 1.0, ...}``."""
    sampling = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key not in SAMPLING_KEYS:
            keys = ", ".join(SAMPLING_KEYS)
            raise ValueError(f"--sampling takes KEY=VALUE, KEY one of {keys}; got {pair!r}")
        sampling[key] = SAMPLING_KEYS[key](value)
    return sampling


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the release, print its sha256; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by train.py")
    parser.add_argument("output", help="the release file to write (.safetensors)")
    parser.add_argument(
        "--no-ema", action="store_true", help="release the trained weights, not the EMA ones"
    )
    parser.add_argument(
        "--sampling",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="editing defaults the release carries, e.g. noise_correlation=1.0",
    )
    parser.add_argument(
        "--format",
        choices=("gen1", "sd", "controlnet", "lora"),
        default="gen1",
        help="gen1: a Gen-1 release (default); sd: an SD single file + .yaml (SDTrainer); "
        "controlnet: a ControlNet in the original layout, control_model.* (ControlNetTrainer); "
        "lora: a kohya LoRA file, lora_unet_* (LoraTrainer)",
    )
    parser.add_argument(
        "--component",
        choices=sorted(COMPONENTS),
        help="export the network of a component trainer's checkpoint instead",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        print(f"release.py: error: output must be a .safetensors file, got {args.output}",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        sampling = parse_sampling(args.sampling)
        if args.component:
            digest = export_component(args.checkpoint, args.output, args.component)
        elif args.format == "sd":
            from model.training.sd_training import release_sd

            digest = release_sd(args.checkpoint, args.output, use_ema=not args.no_ema)
        elif args.format == "controlnet":
            from model.training.controlnet_training import release_controlnet

            digest = release_controlnet(args.checkpoint, args.output, use_ema=not args.no_ema)
        elif args.format == "lora":
            from model.training.lora_training import release_lora

            if args.no_ema:
                raise ValueError("--no-ema does not apply to --format lora (no EMA is kept)")
            digest = release_lora(args.checkpoint, args.output)
        else:
            digest = release_from_checkpoint(
                args.checkpoint, args.output, use_ema=not args.no_ema, sampling=sampling
            )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"release.py: error: {err}", file=sys.stderr)
        return 1
    print(f"{digest}  {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
