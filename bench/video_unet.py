"""Video UNet time and peak memory vs diffusers' UNetMotionModel (AnimateDiff).

Both share one spatial config: ours adds Gen-1's temporal convolutions and temporal
attention, diffusers adds AnimateDiff motion modules (MotionAdapter defaults, with the
mid block). Forward (inference mode) and forward+backward (MSE loss), F = 8 and 16,
each measured in a fresh process; gradient checkpointing rows for forward+backward.
Both get the same random spatial weights, inputs and dtype (float32); ``--check`` asserts
that they share the spatial model and that their temporal layers run.

On CPU the spatial config is a reduced SD 1.5 (64 base channels, 32x32 latents, batch 1)
to fit the machine, and time is the process's CPU time on ``--threads`` threads (1 by
default: on a small CPU shared with other work, wall time and multi-threaded runs vary
several-fold). On CUDA the config is SD 1.5 itself and time is wall time.
Peak memory is what a call adds, measured as ``bench.common.peak_memory_mib`` says.

    python bench/video_unet.py [--frames 8 16] [--iters 1] [--threads 1] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    devices,
    map_large_buffers_separately,
    peak_memory_mib,
    print_table,
    reuse_heap,
    run_worker,
    summary,
    time_call,
)
from model.nets.unet import UNet  # noqa: E402
from tests.sd_layout import config, randomise  # noqa: E402


def spatial_params(device: str) -> dict:
    """SD 1.5's UNet config; reduced to 64 base channels on CPU to fit the machine."""
    params = config("unet", "sd15")
    if device == "cpu":
        params |= {"model_channels": 64, "num_heads": 8, "context_dim": 256}
    return params


def spatial_state(params: dict) -> dict[str, torch.Tensor]:
    """Random SD-layout weights of the image UNet, shared by both video UNets."""
    torch.manual_seed(0)
    return randomise(UNet(**params).state_dict(), 0)


def randomise_parameters_(model: nn.Module, name_part: str, seed: int) -> int:
    """Give the parameters whose name holds ``name_part`` random O(1)-scale values.

    Temporal layers and motion modules start as zero residuals; random values make them
    change the output, as trained ones do. Returns how many tensors changed.
    """
    chosen = {n: p.detach() for n, p in model.named_parameters() if name_part in n}
    model.load_state_dict(randomise(chosen, seed), strict=False)
    return len(chosen)


def inputs(params: dict, frames: int):
    """A clip ``(1, F, 4, 32, 32)``, its timestep and its text context ``(1, 77, D)``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, frames, params["in_channels"], 32, 32, generator=gen)
    context = torch.randn(1, 77, params["context_dim"], generator=gen)
    return x, torch.tensor([500]), context


def build_ours(params: dict, spatial: dict, checkpointing: bool = False) -> UNet:
    """Our video UNet: the shared spatial weights plus random temporal layers."""
    model = UNet(**{**params, "use_checkpoint": checkpointing}, temporal=True)
    missing, unexpected = model.load_state_dict(spatial, strict=False)
    if unexpected or not all(".temporal." in k for k in missing):
        raise RuntimeError(f"spatial weights do not fit: {unexpected or missing}")
    randomise_parameters_(model, ".temporal.", 2)
    return model


def build_animatediff(params: dict, spatial: dict, checkpointing: bool = False):
    """diffusers' UNetMotionModel: the shared spatial weights plus random motion modules."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    ldm = {"model.diffusion_model." + k: v for k, v in spatial.items()}
    cfg = {
        "model": {
            "params": {
                "unet_config": {"params": {**params, "image_size": 64}},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    dcfg = create_unet_diffusers_config_from_ldm(cfg, ldm)
    unet2d = UNet2DConditionModel(**dcfg)
    unet2d.load_state_dict(convert_ldm_unet_checkpoint(ldm, dcfg), strict=True)
    adapter = MotionAdapter(block_out_channels=tuple(dcfg["block_out_channels"]))
    model = UNetMotionModel.from_unet2d(unet2d, adapter)
    randomise_parameters_(model, ".motion_modules.", 3)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def animatediff_call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
    """Call UNetMotionModel on our ``(B, F, C, H, W)`` clip; returns its ``(B, C, F, H, W)``.

    diffusers 0.42 folds frames into the batch itself but does not repeat the text
    context per frame (its AnimateDiff pipeline does, before the UNet): pass it
    ``(B * F, tokens, D)``, or cross-attention mixes up batch and frames.
    """
    sample = x.transpose(1, 2).contiguous()
    context = context.repeat_interleave(x.shape[1], dim=0)
    return lambda: model(sample, t, encoder_hidden_states=context).sample


def build(impl: str, device: str, frames: int, checkpointing: bool):
    """A video UNet of ``impl`` ('ours' | 'animatediff') on ``device``, and a call on it."""
    params = spatial_params(device)
    spatial = spatial_state(params)
    x, t, context = (v.to(device) for v in inputs(params, frames))
    if impl == "ours":
        model = build_ours(params, spatial, checkpointing).to(device)
        return model, lambda: model(x, t, context)
    model = build_animatediff(params, spatial, checkpointing).to(device)
    return model, animatediff_call(model, x, t, context)


@torch.no_grad()
def check(frames: int = 4) -> None:
    """Both models are what the bench claims: same spatial model, temporal layers that run."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    params = spatial_params("cpu")
    spatial = spatial_state(params)
    x, t, context = inputs(params, frames)
    ours = build_ours(params, spatial).eval()
    animatediff = build_animatediff(params, spatial).eval()
    image = ours(x, t, context, temporal=False)  # the shared spatial UNet, frame by frame
    motion_modules = [m for m in animatediff.modules() if isinstance(m, AnimateDiffTransformer3D)]
    calls = []
    for m in motion_modules:
        m.register_forward_hook(lambda *_: calls.append(1))
    out = animatediff_call(animatediff, x, t, context)()
    assert out.shape == (1, params["out_channels"], frames, 32, 32), out.shape
    assert len(calls) == len(motion_modules) > 0, (len(calls), len(motion_modules))
    assert (out.transpose(1, 2) - image).abs().max() > 1e-2, "motion modules change nothing"
    assert (ours(x, t, context) - image).abs().max() > 1e-2, "temporal layers change nothing"
    for m in motion_modules:
        torch.nn.init.zeros_(m.proj_out.weight)
        torch.nn.init.zeros_(m.proj_out.bias)
    spatial_only = animatediff_call(animatediff, x, t, context)().transpose(1, 2)
    error = (spatial_only - image).abs().max().item()
    assert error < 1e-4 * image.abs().max().item(), f"spatial models differ by {error}"
    print(
        f"ok: output {tuple(out.shape)}, {len(motion_modules)} motion modules ran, "
        f"spatial parity {error:.1e} with motion modules zeroed"
    )


def worker(
    impl: str, device: str, frames: int, mode: str, checkpointing: bool, iters: int, threads: int
) -> dict:
    """Peak memory of a call (after a warm-up one), then the median time of ``iters`` more."""
    if device == "cpu":
        torch.set_num_threads(threads)
        map_large_buffers_separately()
    model, call = build(impl, device, frames, checkpointing)
    if mode == "forward":
        model.eval()

        def step():
            with torch.inference_mode():
                call()
    else:
        model.train()

        def step():
            call().square().mean().backward()
            model.zero_grad(set_to_none=True)

    memory = peak_memory_mib(step, device, warmup=1)
    reuse_heap()
    clock = time.process_time if device == "cpu" else time.perf_counter
    seconds = time_call(step, device, warmup=1, iters=iters, clock=clock)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"time_s": seconds, "peak_mib": memory, "params_m": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="check the two models, then exit")
    args = parser.parse_args()
    if args.check:
        check()
        return
    if args.worker:
        impl, device, frames, mode, ckpt, iters, threads = args.worker
        result = worker(impl, device, int(frames), mode, ckpt == "1", int(iters), int(threads))
        print(json.dumps(result))
        return
    rows = []
    for device in devices():
        for frames in args.frames:
            plain_mib = None
            for mode, ckpt in (("forward", "0"), ("fwd+bwd", "0"), ("fwd+bwd", "1")):
                result = {}
                for impl in ("animatediff", "ours"):
                    worker_args = [impl, device, frames, mode, ckpt, args.iters, args.threads]
                    result[impl] = run_worker(__file__, [str(a) for a in worker_args])
                ours, ref = result["ours"], result["animatediff"]
                if mode == "fwd+bwd" and ckpt == "0":
                    plain_mib = ours["peak_mib"]
                ckpt_ratio = ours["peak_mib"] / plain_mib if ckpt == "1" and plain_mib else None
                rows.append(
                    {
                        "device": device,
                        "F": frames,
                        "pass": mode + (" +ckpt" if ckpt == "1" else ""),
                        "animatediff s": f"{ref['time_s']:.2f}",
                        "ours s": f"{ours['time_s']:.2f}",
                        "time x": f"{ours['time_s'] / ref['time_s']:.2f}",
                        "animatediff MiB": f"{ref['peak_mib']:.0f}",
                        "ours MiB": f"{ours['peak_mib']:.0f}",
                        "mem x": f"{ours['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f}",
                        "ours ckpt/plain MiB": f"{ckpt_ratio:.2f}" if ckpt_ratio else "",
                        "params M (ad/ours)": f"{ref['params_m']:.1f}/{ours['params_m']:.1f}",
                    }
                )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
