"""Data throughput: clips/s of the procedural world and of decord clip reading.

Usage: python bench/data.py [--seconds 3]. Prints one table row per setting. Test videos are
made with imageio-ffmpeg's ffmpeg (testsrc2, H.264) in a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.datamodule import VideoDataModule  # noqa: E402
from data.synthetic import SyntheticWorldDataset  # noqa: E402
from data.video import read_clip  # noqa: E402


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def make_video(folder: Path, size: str, keyframe_interval: int, seconds: int = 6) -> Path:
    """A 30 fps H.264 testsrc2 clip; random starts decode from the keyframe before them."""
    import imageio_ffmpeg

    path = folder / f"testsrc2_{size}_g{keyframe_interval}.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
               "-i", f"testsrc2=size={size}:rate=30", "-t", str(seconds), "-c:v", "libx264",
               "-g", str(keyframe_interval), "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(command, check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for frames, size in [(8, 64), (16, 128), (16, 256)]:
        world = SyntheticWorldDataset(10**6, frames, size)
        counter = iter(range(10**9))
        clips = rate(lambda w=world, c=counter: w[next(c)], args.seconds)
        rows.append((f"world {frames}x{size}x{size}", "1 thread", clips))
    with tempfile.TemporaryDirectory() as folder:
        for source, keyframe_interval in [("640x360", 250), ("1280x720", 250), ("1280x720", 15)]:
            path = make_video(Path(folder), source, keyframe_interval)
            for frames, size in [(8, 64), (16, 256)]:
                rng = np.random.default_rng(0)

                def read(p=path, f=frames, s=size, r=rng):
                    return read_clip(p, f, s, stride=2, rng=r)

                clips = rate(read, args.seconds)
                name = f"decord {source} g{keyframe_interval} -> {frames}x{size}x{size}"
                rows.append((name, "1 thread", clips))
    for workers in (0, 2):
        module = VideoDataModule(
            SyntheticWorldDataset(10**6, 8, 64), batch_size=8, num_workers=workers
        )
        loader = iter(module.train_dataloader())
        next(loader)
        start, batches = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            next(loader)
            batches += 1
        clips = 8 * batches / (time.perf_counter() - start)
        rows.append(("loader world 8x64x64, batch 8", f"{workers} workers", clips))
    print(f"{'setting':<40} {'workers':<10} {'clips/s':>9} {'ms/clip':>8}")
    for name, how, clips in rows:
        print(f"{name:<40} {how:<10} {clips:>9.1f} {1000 / clips:>8.1f}")


if __name__ == "__main__":
    main()
