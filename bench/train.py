"""Training-step throughput and peak memory of the Gen-1 module, tiny and SD 1.5-sized.

A step is what ``Gen1.training_step`` does (VAE encode, depth to structure, CLIP content,
UNet forward and backward) plus the AdamW update, on a batch of the procedural world;
``tiny_world_cached`` takes the same batch from the cache of encoder outputs
(``data/encoded.py``, ``data=world_encoded``), so its step runs the UNet alone.
Each configuration runs in a fresh process so CPU peak memory is clean. On CPU the SD 1.5
row trains the temporal layers only (AdamW state for all 1.3 B parameters does not fit
this machine's memory beside the model) with gradient checkpointing, batch 1.

    python bench/train.py [--steps 3] [--sizes tiny tiny_world tiny_world_cached sd15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    devices,
    map_large_buffers_separately,
    peak_memory_mib,
    print_table,
    reuse_heap,
    run_worker,
    summary,
)

# size -> (overrides, batch, frames, side)
SIZES = {
    "tiny": (["model=tiny"], 4, 8, 64),
    "tiny_world": (["model=tiny_world"], 4, 8, 64),
    "tiny_world_cached": (["model=tiny_world"], 4, 8, 64),
    "sd15": (
        ["model=sd15", "model.trainable=temporal", "model.depth=null", "model.ema_decay=null"],
        1,
        8,
        256,
    ),
}


def build(size: str, device: str):
    """The Gen-1 module of ``size``, its optimizer and one world batch on ``device``."""
    from hydra import compose, initialize_config_dir

    from data.datamodule import collate_samples
    from data.synthetic import SyntheticWorldDataset
    from jobs.training import build_model

    overrides, batch, frames, side = SIZES[size]
    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "run_dir=/tmp/bench_train"])
    model = build_model(cfg.model).to(device).train()
    if size.endswith("_cached"):
        from data.encoded import EncodedClipDataset

        source = {"_target_": "data.synthetic.SyntheticWorldDataset", "num_clips": batch}
        world = EncodedClipDataset(
            {**source, "num_frames": frames, "size": side},
            "/tmp/bench_train/encoded.safetensors",
            cfg.model.vae,
            cfg.model.clip,
            cfg.model.weights.vae,
            cfg.model.depth,
            progress=False,
        )
    else:
        world = SyntheticWorldDataset(batch, num_frames=frames, size=side)
    data = collate_samples([world[i] for i in range(batch)])
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return model, optimizer, data


def worker(size: str, device: str, steps: int) -> dict:
    if device == "cpu":
        map_large_buffers_separately()  # so peak RSS follows live tensor memory
    model, optimizer, batch = build(size, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss, _ = model.loss(batch, model.unet, torch.Generator(device).manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = peak_memory_mib(step, device)  # the first step also allocates AdamW state
    reuse_heap()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    batch_size = batch["frames"].shape[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    return {
        "step_s": seconds,
        "samples_s": batch_size / seconds,
        "peak_mib": memory,
        "trainable_m": trainable,
        "batch": list(batch["frames"].shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--worker", nargs=3)
    args = parser.parse_args()
    if args.worker:
        size, device, steps = args.worker
        print(json.dumps(worker(size, device, int(steps))))
        return
    rows = []
    for device in devices():
        for size in args.sizes:
            r = run_worker(__file__, [size, device, str(args.steps)])
            rows.append(
                {
                    "device": device,
                    "model": size,
                    "batch (B,F,C,H,W)": "x".join(map(str, r["batch"])),
                    "trainable M": f"{r['trainable_m']:.1f}",
                    "step s": f"{r['step_s']:.2f}",
                    "samples/s": f"{r['samples_s']:.2f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                }
            )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
