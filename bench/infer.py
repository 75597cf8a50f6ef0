"""Editing long videos in temporal windows: peak memory flat and time linear in the frame count.

Runs the whole editing pipeline (chunked MiDaS depth, structure, CLIP content, Gen-1 guidance
over overlapping windows, chunked VAE decoding) of the tiny Gen-1 at 64x64 on videos of L, 2L
and 3L frames, L the window length, each length in a fresh process. Windows overlap by L/2, so
the window count (1, 3, 5) and every per-frame cost grow linearly with the frames. Targets:
peak memory at 3L within 1.1x that at L; time linear (equal increments from L to 2L and from 2L
to 3L, within 10%).

    python bench/infer.py [--window 8] [--steps 4] [--iters 2] [--repeats 2]

Each length runs ``repeats`` times in fresh processes (interleaved); the table shows the least
peak memory and the best time seen, on the CPU with one thread.

    python bench/infer.py --long [--lengths 16 64 256 1500] [--steps 2]

edits videos of 16 to 1,500 frames each way (``window.mode``, ``--modes``): ``blend``
(every frame sampled together, the input and the latents of the whole video in memory),
``sequential`` (``model.editing.long``: window after window) and ``fifo``
(``model.editing.fifo``: a queue at staggered noise levels), the last two with frames made
from their index as a reader would decode them and the output handed on and dropped as a
writer would take it. One fresh process per (mode, length), one thread; peak memory above
the model's and CPU time.

    python bench/infer.py --profile [--cold] [--cases bundled sd15] [--frames 8] [--threads N]

prints instead where an edit's time goes, in seconds per frame: media decode, CLIP, MiDaS,
VAE encode, the UNet per step, VAE decode, encode/mux (``bench/edit_profile.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import edit_profile  # noqa: E402
from bench.common import devices, peak_memory_mib, print_table, run_worker, summary, time_call  # noqa: E402
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.encoders.frozen import build_depth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def tiny_gen1(device: str):
    """The tiny Gen-1 (configs/model/tiny.yaml), random weights, no EMA copy, eval mode."""
    from hydra import compose, initialize_config_dir

    from jobs.training import build_model

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=unused", "model.ema_decay=null"])
    torch.manual_seed(0)
    return build_model(cfg.model).eval().to(device)


def worker(device: str, frames: int, window: int, steps: int, iters: int) -> dict:
    """Peak memory of one edit of a ``frames``-frame video, and its best time of ``iters``.

    On the CPU one thread: the time then measures work, not contention with other processes.
    """
    if device == "cpu":
        torch.set_num_threads(1)
    gen1 = tiny_gen1(device)
    midas = build_depth({"name": "midas_tiny", "chunk_size": window}).to(device)
    video = torch.rand(1, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    video = video * 2 - 1
    content = gen1.encode_content(video[:, 0].to(device))
    settings = EditSettings(
        steps=steps, w_t=1.5, window_length=window, window_overlap=window // 2, chunk_size=window
    )
    calls = []

    def edit():
        result = edit_video(
            gen1, video, content, settings, depth_estimator=midas,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        calls.append(result.window_calls)

    peak = peak_memory_mib(edit, device)
    seconds = min(time_call(edit, device, warmup=0, iters=1) for _ in range(iters))
    return {"peak_mib": peak, "time_s": seconds, "window_calls": calls[0]}


def long_worker(mode: str, frames: int, window: int, steps: int) -> dict:
    """Peak memory and time of one ``mode`` edit of a ``frames``-frame video (64x64)."""
    from model.editing.long import edit_long_video

    torch.set_num_threads(1)
    gen1 = tiny_gen1("cpu")
    midas = build_depth({"name": "midas_tiny", "chunk_size": window})

    def read(indices: list[int]) -> torch.Tensor:  # frame k is the same whatever the window
        frames = [
            torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(k)) for k in indices
        ]
        return torch.stack(frames)[None] * 2 - 1

    content = gen1.encode_content(read([0])[:, 0])
    settings = EditSettings(steps=steps, window_length=window, window_overlap=2, chunk_size=window)
    generator = torch.Generator().manual_seed(0)

    def edit():
        if mode == "blend":
            edit_video(gen1, read(list(range(frames))), content, settings,
                       depth_estimator=midas, generator=generator)  # fmt: skip
        else:
            edit_long_video(gen1, frames, read, content, settings, lambda *out: None,
                            depth_estimator=midas, generator=generator, mode=mode)  # fmt: skip

    # One call, timed as it runs: CPU time of the (one-thread) process, which other work on
    # a shared machine disturbs far less than wall time.
    start = time.process_time()
    peak = peak_memory_mib(edit, "cpu")
    return {"peak_mib": peak, "time_s": time.process_time() - start}


def run_long(lengths: list[int], window: int, steps: int, modes: list[str]) -> None:
    """The table of ``--long``: every mode at every length."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    rows = []
    for frames in lengths:
        for mode in modes:
            args = ["long", mode, str(frames), str(window), str(steps)]
            result = run_worker(__file__, args)
            rows.append({
                "frames": frames, "mode": mode, "peak_mib": f"{result['peak_mib']:.1f}",
                "time_s": f"{result['time_s']:.1f}",
                "ms/frame": f"{1e3 * result['time_s'] / frames:.0f}",
            })  # fmt: skip
            print(rows[-1], flush=True)
    print(f"\ncpu, one thread: tiny Gen-1 (random weights), {SIZE}x{SIZE}, windows of {window} "
          f"frames, overlap 2 (sequential), anchor frame 0 (sequential, fifo), {steps} "
          "DPM++ 2M steps, w=7.5, w_t=1")  # fmt: skip
    print_table(rows, ["frames", "mode", "time_s", "ms/frame", "peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--window", type=int, default=8, help="window length L")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=2, help="timed edits per process")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per length")
    parser.add_argument("--profile", action="store_true", help="where an edit's time goes")
    parser.add_argument("--cold", action="store_true", help="--profile: a fresh prepack cache")
    parser.add_argument("--cases", nargs="+", default=list(edit_profile.CASES))
    parser.add_argument("--frames", type=int, default=8, help="--profile: frames of the sd15 case")
    parser.add_argument("--threads", type=int, default=0, help="--profile: 0 the default")
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--long", action="store_true", help="window modes, 16-1500 frames")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1500])
    parser.add_argument("--modes", nargs="+", default=["blend", "sequential", "fifo"])
    args = parser.parse_args()
    if args.worker and args.worker[0] == "long":
        _, mode, frames, window, steps = args.worker
        print(json.dumps(long_worker(mode, int(frames), int(window), int(steps))))
        return
    if args.long:
        run_long(args.lengths, args.window, args.steps, args.modes)
        return
    if args.worker and args.worker[0] == "profile":
        _, case, cold, frames, threads = args.worker
        print(json.dumps(edit_profile.worker(case, cold == "1", int(frames), int(threads))))
        return
    if args.profile:
        edit_profile.profile(args.cold, args.cases, args.frames, args.threads)
        return
    if args.worker:
        device, frames, window, steps, iters = args.worker
        print(json.dumps(worker(device, int(frames), int(window), int(steps), int(iters))))
        return
    # Large CPU buffers are mmapped and handed back when freed, so the resident set follows
    # the live tensors instead of glibc's heap growth (which made peaks jump by ~10 MiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    for device in devices():
        runs = {multiple: [] for multiple in (1, 2, 3)}
        for _ in range(args.repeats):  # interleaved, so that load changes hit every length
            for multiple, results in runs.items():
                frames = multiple * args.window
                worker_args = [device, str(frames), args.window, args.steps, args.iters]
                results.append(run_worker(__file__, [str(a) for a in worker_args]))
        rows = [
            {
                "frames": multiple * args.window,
                "peak_mib": min(r["peak_mib"] for r in results),
                "time_s": min(r["time_s"] for r in results),
                "window_calls": results[0]["window_calls"],
            }
            for multiple, results in runs.items()
        ]
        base_mib = rows[0]["peak_mib"]
        increments = [b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:], strict=False)]
        memory_ratio = rows[-1]["peak_mib"] / base_mib
        for row in rows:
            row["windows"] = row["window_calls"] // args.steps
            row["s/window"] = f"{row['time_s'] / row['windows']:.2f}"
            row["mem_vs_L"] = f"{row['peak_mib'] / base_mib:.3f}"
            row["peak_mib"] = f"{row['peak_mib']:.1f}"
            row["time_s"] = f"{row['time_s']:.2f}"
        print(f"\n{device}: tiny Gen-1, {SIZE}x{SIZE}, window L={args.window} overlap "
              f"{args.window // 2}, {args.steps} steps, w_t=1.5 (3 branches)")  # fmt: skip
        print_table(rows, ["frames", "windows", "time_s", "s/window", "peak_mib", "mem_vs_L"])
        ratio = increments[1] / increments[0]
        print(f"memory 3L / L: {memory_ratio:.3f} (target <= 1.1)")
        print(f"time increments L->2L {increments[0]:.2f}s, 2L->3L {increments[1]:.2f}s: "
              f"ratio {ratio:.3f} (linear: within 0.9-1.1)")  # fmt: skip


if __name__ == "__main__":
    main()
