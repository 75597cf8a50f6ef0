"""Make a release file from a training checkpoint:
``python release.py CHECKPOINT.ckpt OUT.safetensors [--no-ema]``.

The release holds the EMA UNet (the trained weights with ``--no-ema``) and the frozen parts,
in fp16, with the model's config as JSON metadata; ``infer.py checkpoint=OUT.safetensors``
loads it. Prints the release's sha256. Exit status 1 with one line on stderr on failure.
"""

from __future__ import annotations

import argparse
import sys

from model.checkpoint import CheckpointError
from model.release import release_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the release, print its sha256; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by train.py")
    parser.add_argument("output", help="the release file to write (.safetensors)")
    parser.add_argument(
        "--no-ema", action="store_true", help="release the trained weights, not the EMA ones"
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        print(f"release.py: error: output must be a .safetensors file, got {args.output}",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        digest = release_from_checkpoint(args.checkpoint, args.output, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"release.py: error: {err}", file=sys.stderr)
        return 1
    print(f"{digest}  {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
