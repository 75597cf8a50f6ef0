"""Data throughput: clips/s of the procedural world, decord clip reading, the DataLoader,
and WebDataset shards (written by shard.py, streamed by data/shard_stream.py).

Usage: python bench/data.py [--seconds 3]. Prints one table row per setting. Test videos are
made with imageio-ffmpeg's ffmpeg (testsrc2, H.264) in a temporary folder. The shard rows
use 8 copies of the 640x360 g250 video in 3 shards: plain shards (the mp4 bytes, decoded
at every read, against the decord rows that read the file) and encoded shards (shard.py
encode=true with the tiny world's encoders: VAE posterior, depth, CLIP embeddings, all a
data=shards_encoded step reads). "1 thread" rows take one sample at a time from the stream,
"loader" rows batches of 8 from ShardDataModule's DataLoader. "shard.py write" rows time the
whole job (Lightning's setup and, encoded, building the encoders included).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.datamodule import VideoDataModule  # noqa: E402
from data.shard_stream import JointShardStream, ShardDataModule  # noqa: E402
from data.shards import EncodedShardClips, ShardClips  # noqa: E402
from data.synthetic import SyntheticWorldDataset  # noqa: E402
from data.video import read_clip  # noqa: E402

SHARD_CLIPS, SAMPLES_PER_SHARD = 8, 3  # 3 shards: both of 2 workers get a shard
Row = tuple[str, str, float]


def rate(fn: Callable[[], object], seconds: float, min_calls: int = 1) -> float:
    """Calls per second of ``fn`` over about ``seconds`` and at least ``min_calls`` calls
    (after one warm-up call)."""
    fn()
    count, start = 0, time.perf_counter()
    while count < min_calls or time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def loader_rate(loader: Iterable[dict], batch_size: int, seconds: float) -> float:
    """Clips per second a DataLoader hands out (its workers start in the warm-up call); a
    few batches at least, as a slow one may take longer than ``seconds``."""
    batches = iter(loader)
    return batch_size * rate(lambda: next(batches), seconds, min_calls=4)


def make_video(folder: Path, size: str, keyframe_interval: int, seconds: int = 6) -> Path:
    """A 30 fps H.264 testsrc2 clip; random starts decode from the keyframe before them."""
    import imageio_ffmpeg

    path = folder / f"testsrc2_{size}_g{keyframe_interval}.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
               "-i", f"testsrc2=size={size}:rate=30", "-t", str(seconds), "-c:v", "libx264",
               "-g", str(keyframe_interval), "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(command, check=True)
    return path


def write_shards(videos: Path, output: Path, *overrides: str) -> float:
    """Clips per second shard.py's job (``jobs.shards.run``) writes ``videos`` to ``output``."""
    from hydra import compose, initialize_config_dir

    from jobs.shards import run

    settings = [f"run_dir={output}", f"videos.root={videos}", f"output={output}",
                f"samples_per_shard={SAMPLES_PER_SHARD}", "num_workers=0", *overrides]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("shard", overrides=settings)
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.enable_model_summary = False
    start = time.perf_counter()
    written = run(cfg)["video"]["samples"]
    return written / (time.perf_counter() - start)


def shard_rows(video: Path, source: str, folder: Path, seconds: float) -> list[Row]:
    """Write plain and encoded shards of copies of ``video``, then read them back: one
    sample at a time through the stream (the cost of a worker), and in batches of 8 through
    the ShardDataModule's DataLoader with 0 and 2 workers (its lanes)."""
    videos = folder / "videos"
    videos.mkdir()
    for i in range(SHARD_CLIPS):  # the same bytes: each clip's start and crop still differ
        shutil.copy(video, videos / f"clip{i:02d}.mp4")
    plain, encoded = folder / "plain", folder / "encoded"
    rows = [(f"shard.py write {source}", "0 workers", write_shards(videos, plain))]
    # data=shards_encoded's default clip; the tiny VAE's mid-block attention over 64x64
    # latents dominates encoding on a CPU (0.5 to 2 s a frame here), so no longer clips.
    encode = ["encode=true", "model=tiny_world", "num_frames=8", "size=256"]
    written = write_shards(videos, encoded, *encode)
    rows.append(("shard.py write encoded 8x256x256", "0 workers", written))
    settings = [
        (f"shards {source}", ShardClips, {"num_frames": 8, "size": 64, "stride": 2}),
        (f"shards {source}", ShardClips, {"num_frames": 16, "size": 256, "stride": 2}),
        ("shards encoded", EncodedShardClips, {"num_frames": 8, "size": 256}),
    ]
    for name, kind, clip in settings:
        index = str((encoded if kind is EncodedShardClips else plain) / "videos.json")
        shape = f"{clip['num_frames']}x{clip['size']}x{clip['size']}"
        stream = iter(JointShardStream(kind(index, **clip), None, 0.0, 1, seed=0))
        rows.append((f"{name} -> {shape}", "1 thread", rate(lambda s=stream: next(s), seconds)))
        for workers in (0, 2):
            module = ShardDataModule(kind(index, **clip), batch_size=8, num_workers=workers)
            clips = loader_rate(module.train_dataloader(), 8, seconds)
            rows.append((f"loader {name} {shape}, batch 8", f"{workers} workers", clips))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Lightning's banners and its hints for the shard job's 0 workers are not results.
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
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
            clips = loader_rate(module.train_dataloader(), 8, args.seconds)
            rows.append(("loader world 8x64x64, batch 8", f"{workers} workers", clips))
        video = Path(folder) / "testsrc2_640x360_g250.mp4"  # made for the decord rows
        rows += shard_rows(video, "640x360 g250", Path(folder), args.seconds)
    print(f"{'setting':<48} {'workers':<10} {'clips/s':>9} {'ms/clip':>8}")
    for name, how, clips in rows:
        print(f"{name:<48} {how:<10} {clips:>9.1f} {1000 / clips:>8.1f}")


if __name__ == "__main__":
    main()
