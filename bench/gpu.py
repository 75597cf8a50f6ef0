"""The GPU check: what a maintainer runs when a GPU is at hand (under 8 minutes on one large
GPU); ``--tiny`` runs the same on the CPU with the tiny configs. Prints one table.

- train: a bf16-autocast training step (forward, backward, AdamW) of the SD 1.5-sized video
  UNet (random weights, temporal layers, structure channel, ViT-L content projection) on one
  clip of 16 frames at 256x256 (32x32 latents), with and without activation checkpointing:
  step time, peak memory, achieved TFLOP/s (model FLOPs counted by ``FlopCounterMode``, no
  recomputation) and MFU against the device's peak dense bf16 rate (``--peak-tflops``).
- edit: fp16 inference of 16 frames at 512x512 through ``edit_video`` (random-weight SD 1.5
  Gen-1 with DPT-Hybrid and ViT-L/14; dpmpp_2m, 20 steps, w = 7.5, one 16-frame window):
  seconds per frame, peak memory.
- ddp: with more than one device (``--tiny``: two CPU processes, gloo), a step of image and
  of video batches under DDP three ways: the temporal branch tied into the graph with a zero
  weight (what Gen1 does), the temporal branch run with a zero gate, and
  ``find_unused_parameters=True``.
- fsdp: ``train.py trainer=fsdp`` on every visible GPU (tiny Gen-1): 4 steps, resumed to 6,
  ``release.py`` on the checkpoint, the release loaded on one device.

    python bench/gpu.py [--tiny] [--peak-tflops N] [--skip edit ddp fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_table, summary  # noqa: E402

# Peak dense bf16 tensor rates (TFLOP/s), matched in order against the device name.
PEAK_BF16 = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
             ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
             ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("4090", 165.2),
             ("3090", 71.0), ("A6000", 154.8)]  # fmt: skip


def peak_tflops(device: str, given: float | None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: ``given``, else looked up by the CUDA name."""
    if given or device == "cpu":
        return given
    name = torch.cuda.get_device_name()
    return next((rate for key, rate in PEAK_BF16 if key in name), None)


def unet_config(tiny: bool, checkpointing: bool, channels: int | None = None) -> dict:
    """The video UNet of model=sd15 (or model=tiny; or sd15's layout at ``channels`` base
    channels) as keyword arguments."""
    from omegaconf import OmegaConf

    name = "tiny" if tiny and not channels else "sd15"
    params = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/unet/{name}.yaml"))
    params.update(
        OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/{name}.yaml"))["unet"]
    )
    params.pop("_target_")
    if channels:
        params["model_channels"] = channels
    return {**params, "use_checkpoint": checkpointing}


def sync(device: str) -> None:
    """Wait for queued CUDA work (before reading a clock)."""
    if device == "cuda":
        torch.cuda.synchronize()


def step_inputs(args, unet, batch: int, frames: int, device: str):
    """Noised latents with their structure channel, timesteps, content and a target."""
    latent = args.side // (4 if args.tiny else 8)  # the tiny VAE is f=4, SD's f=8
    if hasattr(unet, "context_proj"):
        context_dim = unet.context_proj.in_features
    else:
        context_dim = next(
            m.to_k.in_features for n, m in unet.named_modules() if n.endswith("attn2")
        )
    x = torch.randn(batch, frames, unet.in_channels, latent, latent, device=device)
    context = torch.randn(batch, 1, context_dim, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, frames, unet.out_channels, latent, latent, device=device)
    return x, t, context, target


def train_step(args, device: str, checkpointing: bool) -> dict:
    """Step time, peak memory and FLOPs of a bf16 training step of the video UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.nets.unet import UNet

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet(**unet_config(args.tiny, checkpointing)).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    x, t, context, target = step_inputs(args, unet, 1, args.frames, device)

    inputs = (x, t, context, target)
    timed_step(unet, optimizer, inputs, device)  # warm-up: kernels chosen, AdamW state made
    flops = None
    if not checkpointing:
        with FlopCounterMode(display=False) as counter:
            with half(device):
                loss = (unet(x, t, context).float() - target).pow(2).mean()
            loss.backward()
        flops = counter.get_total_flops()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_step(unet, optimizer, inputs, device, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return {"seconds": seconds, "peak_gib": peak, "flops": flops, "params_m": params}


def half(device: str):
    """bf16 autocast on GPUs (what trainer=gpu's bf16-mixed does); fp32 on the CPU, where
    bf16 convolutions are far slower than fp32 ones."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def timed_step(model, optimizer, inputs, device, steps=1, tied=(), **kwargs) -> float:
    """Mean seconds of ``steps`` training steps (MSE to the target, AdamW); ``tied``
    parameters enter the loss with weight zero (they get zero gradients)."""
    x, t, context, target = inputs
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with half(device):
            loss = (model(x, t, context, **kwargs).float() - target).pow(2).mean()
        if tied:
            loss = loss + 0.0 * sum(p.sum() for p in tied)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / steps


def edit(args, device: str) -> dict:
    """fp16 (bf16 on CPU) edit of 16 frames at 512x512 (--tiny: 64x64) with random weights."""
    from hydra import compose, initialize_config_dir

    from jobs.training import build_model
    from model.editing.pipeline import edit_video
    from model.editing.precision import autocast, cast_for_inference
    from model.editing.settings import EditSettings

    side = 64 if args.tiny else 512
    overrides = ["model=tiny"] if args.tiny else ["model=sd15", "model.unet.use_checkpoint=false"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "model.ema_decay=null", "run_dir=/tmp"])
    torch.manual_seed(0)
    with torch.device(device):
        gen1 = build_model(cfg.model).eval().requires_grad_(False)
    dtype = torch.float16 if device == "cuda" else None  # the CPU: fp32, prepacked
    if dtype is not None:
        cast_for_inference(gen1, dtype)
    frames = torch.rand(1, args.frames, 3, side, side) * 2 - 1
    settings = EditSettings(steps=args.edit_steps, window_length=args.frames, window_overlap=0)
    with autocast(device, dtype):
        content = gen1.encode_content(frames[:, 0].to(device))

    def run():
        generator = torch.Generator().manual_seed(0)
        return edit_video(
            gen1, frames, content, settings, generator=generator, autocast_dtype=dtype
        )

    run()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"seconds": seconds, "per_frame": seconds / args.frames, "peak_gib": peak, "side": side}


def ddp_worker(rank: int, world: int, args, port: int, queue) -> None:
    """One DDP process: image and video steps of the video UNet, three ways."""
    from torch.nn.parallel import DistributedDataParallel

    from model.nets.frames import Frames
    from model.nets.unet import UNet

    class GatedUNet(UNet):  # image batches run the temporal branch with a zero gate
        def _frames(self, num_frames, batch, temporal, device):
            if num_frames == 1 and isinstance(temporal, torch.Tensor) and not temporal.any():
                return Frames(1, gate=torch.zeros(batch, 1, 1, 1, device=device))
            return super()._frames(num_frames, batch, temporal, device)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    if device == "cpu":  # more threads than cores stall at every barrier (10x on 2 cores)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    ways = ("tie", "gate", "find_unused")

    def build(way: str):
        torch.manual_seed(0)
        with torch.device(device):
            params = unet_config(args.tiny, False, args.ddp_channels)
            unet = (GatedUNet if way == "gate" else UNet)(**params).train()
        model = DistributedDataParallel(
            unet,
            device_ids=[rank] if device == "cuda" else None,
            find_unused_parameters=way == "find_unused",
        )
        return unet, model, torch.optim.AdamW(unet.parameters(), lr=1e-5)

    # Rounds alternate the three ways (all built at once) so that a busy machine's swings
    # fall on each alike; the median round counts. On a GPU one round, one model at a time.
    built = {way: build(way) for way in ways} if args.rounds > 1 else {}
    timings: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for way in ways:
            unet, model, optimizer = built[way] if built else build(way)
            for kind, frames in (("image", 1), ("video", args.frames)):
                inputs = step_inputs(args, unet, args.ddp_batch, frames, device)
                on = torch.full((args.ddp_batch,), frames > 1, device=device)
                tied = unet.temporal_parameters() if way == "tie" and frames == 1 else ()
                timed_step(model, optimizer, inputs, device, 1, tied, temporal=on)
                seconds = timed_step(
                    model, optimizer, inputs, device, args.steps, tied, temporal=on
                )
                timings.setdefault(f"{way}/{kind}", []).append(seconds)
    if rank == 0:
        queue.put({key: sorted(times)[len(times) // 2] for key, times in timings.items()})
    torch.distributed.destroy_process_group()


def ddp(args, world: int) -> dict:
    """Median seconds per step ("tie/image", "gate/video", ...) on ``world`` processes."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = 29400 + os.getpid() % 500
    context_processes = mp.start_processes(
        ddp_worker, (world, args, port, queue), nprocs=world, join=False, start_method="spawn"
    )
    results = queue.get()
    context_processes.join()
    return results


def fsdp(args) -> dict:
    """train.py trainer=fsdp on every visible GPU: 4 steps, resume to 6, release, load."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_fsdp_"))
    common = ["experiment=tiny", "trainer=fsdp", "trainer.devices=-1",
              "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
              "~callbacks.progress", "callbacks.checkpoint.every_n_train_steps=2",
              f"hydra.run.dir={run_dir}"]  # fmt: skip
    start = time.perf_counter()
    for extra in (["trainer.max_steps=4"], ["trainer.max_steps=6", "ckpt_path=last"]):
        out = subprocess.run([sys.executable, "train.py", *common, *extra], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0 or "finished at step" not in out.stdout + out.stderr:
            return {"ok": False, "error": (out.stdout + out.stderr)[-2000:]}
    release = run_dir / "gen1.safetensors"
    out = subprocess.run([sys.executable, "release.py", str(run_dir / "checkpoints/last.ckpt"),
                          str(release)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        return {"ok": False, "error": out.stderr[-2000:]}
    from model.training.loading import load_gen1

    gen1 = load_gen1(release)
    return {"ok": True, "seconds": time.perf_counter() - start, "params_m": sum(
        p.numel() for p in gen1.unet.parameters()) / 1e6}  # fmt: skip


def attempt(row, check: str, what: str, fn, *args):
    """``fn(*args)``, or None after a row saying how it failed (out of memory, an error):
    one failing check must not lose the others' numbers on a rare GPU."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table, the rest still runs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        line = (str(err).strip().splitlines() or [""])[0][:120]
        row(check, what, seconds=f"FAILED: {type(err).__name__}: {line}")
        return None


def rate_text(flops: float | None, seconds: float) -> str:
    """Achieved FLOP/s of ``flops`` per step in ``seconds``, as text ("n/a" unknown)."""
    if not flops:
        return "n/a"
    rate = flops / seconds
    if rate >= 1e12:
        return f"{rate / 1e12:.1f} TFLOP/s ({flops / 1e12:.2f} TFLOP/step)"
    return f"{rate / 1e9:.1f} GFLOP/s ({flops / 1e9:.1f} GFLOP/step)"


def main() -> None:
    """Parse the arguments, run the checks, print the table."""
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 rate")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "edit", "ddp", "fsdp"])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--ddp-channels", type=int, help="ddp: SD 1.5's layout at this many base channels"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("no CUDA device is visible: run with --tiny on the CPU")
    args.frames, args.side = 16, 64 if args.tiny else 256
    args.steps, args.edit_steps, args.ddp_batch = (3, 4, 2) if args.tiny else (5, 20, 1)
    args.rounds = 5 if args.tiny else 1
    label = "cpu" if device == "cpu" else torch.cuda.get_device_name()
    peak = peak_tflops(device, args.peak_tflops)
    size = "tiny" if args.tiny else "SD 1.5"
    precision = "bf16" if device == "cuda" else "fp32"
    rows = []

    def row(check: str, what: str, **values) -> None:
        rows.append({"check": check, "what": what, **values})
        print(json.dumps(rows[-1]), flush=True)

    if "train" not in args.skip:
        latent = args.side // (4 if args.tiny else 8)  # the tiny VAE is f=4, SD's f=8
        flops = None
        for checkpointing in (False, True):
            what = f"{size} video UNet, 1x{args.frames}x{latent}x{latent} latents, {precision}"
            what += ", checkpointing" if checkpointing else ""
            r = attempt(row, "train", what, train_step, args, device, checkpointing)
            if r is None:
                continue
            flops = flops or r["flops"]
            mfu = f"{100 * flops / r['seconds'] / 1e12 / peak:.1f} %" if peak and flops else "n/a"
            row(
                "train",
                what.replace("UNet", f"UNet ({r['params_m']:.0f} M)"),
                seconds=f"{r['seconds']:.3f} s/step",
                memory=f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] else "",
                rate=rate_text(flops, r["seconds"]),
                mfu=mfu,
            )
    if "edit" not in args.skip:
        side = 64 if args.tiny else 512
        what = f"{size} Gen-1 edit_video, {args.frames} frames {side}x{side}, "
        what += f"{'fp16' if device == 'cuda' else 'fp32'}, {args.edit_steps} steps, w=7.5"
        r = attempt(row, "edit", what, edit, args, device)
        if r is not None:
            row(
                "edit",
                what,
                seconds=f"{r['per_frame']:.3f} s/frame ({r['seconds']:.1f} s)",
                memory=f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] else "",
            )
    world = torch.cuda.device_count() if device == "cuda" else 2
    if "ddp" not in args.skip and world > 1:
        layout = f"SD 1.5 layout at {args.ddp_channels} ch" if args.ddp_channels else size
        what = f"{world} x {device}, {layout}, batch {args.ddp_batch}/device"
        r = attempt(row, "ddp", what, ddp, args, world)
        for way in ("tie", "gate", "find_unused") if r is not None else ():
            seconds = f"image {r[way + '/image']:.3f} s, video {r[way + '/video']:.3f} s"
            row("ddp", f"{what}: {way}", seconds=seconds)
    if "fsdp" not in args.skip and device == "cuda":
        what = "train.py trainer=fsdp (tiny): 4 steps, resume to 6, release.py, load"
        r = attempt(row, "fsdp", what, fsdp, args)
        if r is not None:
            seconds = f"{r['seconds']:.0f} s" if r["ok"] else "FAILED"
            row("fsdp", what, seconds=seconds, memory=r.get("error", "")[-300:])
    print()
    print(f"device: {label}; peak bf16: {peak or 'unknown'} TFLOP/s")
    print_table(rows, ["check", "what", "seconds", "memory", "rate", "mfu"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
