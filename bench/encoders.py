"""Throughput of the frozen conditioning encoders at their native input sizes.

Prints frames/s of each MiDaS network (through ``DepthEstimator``: preprocessing, network,
resize back) and of each CLIP image embedder (``encode_image``), with random weights, on
the CPU and, when present, on CUDA (fp16 there). Examples:

    python bench/encoders.py                       # everything, CPU (+ CUDA if present)
    python bench/encoders.py --depth midas_tiny midas_v21_small_256 --clip clip_tiny
    python bench/encoders.py --threads 1           # on a shared, busy machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import summary  # noqa: E402
from model.encoders.clip import build_clip, clip_config  # noqa: E402
from model.encoders.depth import MIDAS_CONFIGS, DepthEstimator, build_midas  # noqa: E402

DEPTH_MODELS = ["midas_tiny", "midas_v21_small_256", "dpt_hybrid_384", "dpt_large_384"]
CLIP_MODELS = ["clip_tiny", "ViT-L-14-quickgelu", "ViT-H-14"]


def frames_per_second(fn, frames: int, device: torch.device, iters: int) -> float:
    """Frames/s of ``fn()`` (``frames`` frames a call): one warm-up, then at least ``iters``
    calls and at least one second."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < iters or time.perf_counter() - start < 1.0:
        fn()
        sync()
        calls += 1
    return frames * calls / (time.perf_counter() - start)


def bench_depth(name: str, device: torch.device, dtype: torch.dtype, batch: int, iters: int):
    side = MIDAS_CONFIGS[name].net_size
    with torch.device(device):
        net = build_midas(name).to(dtype)
    estimator = DepthEstimator(net, chunk_size=batch).to(device)
    frames = torch.rand(1, batch, 3, side, side, device=device) * 2 - 1
    return side, frames_per_second(lambda: estimator(frames), batch, device, iters)


def bench_clip(name: str, device: torch.device, dtype: torch.dtype, batch: int, iters: int):
    embedder = build_clip(name).to(device=device, dtype=dtype)  # open_clip builds on the CPU
    size = clip_config(name)["vision_cfg"]["image_size"]
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    return size, frames_per_second(lambda: embedder.encode_image(images), batch, device, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--depth", nargs="*", default=DEPTH_MODELS, choices=DEPTH_MODELS)
    parser.add_argument("--clip", nargs="*", default=CLIP_MODELS)
    parser.add_argument("--batch", type=int, default=None, help="frames per call (CPU 2, GPU 16)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (CPU 2, GPU 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(f"{'encoder':<22} {'device':<6} {'dtype':<9} {'size':>5} {'batch':>5} {'frames/s':>10}")
    for device in devices:
        cuda = device.type == "cuda"
        dtype = torch.float16 if cuda else torch.float32
        batch = args.batch or (16 if cuda else 2)
        iters = args.iters or (10 if cuda else 2)
        jobs = [(n, bench_depth) for n in args.depth] + [(n, bench_clip) for n in args.clip]
        for name, bench in jobs:
            size, fps = bench(name, device, dtype, batch, iters)
            dtype_name = str(dtype).removeprefix("torch.")
            print(f"{name:<22} {device.type:<6} {dtype_name:<9} {size:>5} {batch:>5} {fps:>10.2f}")
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
