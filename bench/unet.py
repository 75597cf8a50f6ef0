"""Forward time and peak memory of our UNet vs diffusers' UNet2DConditionModel.

Same weights (a random SD-layout state dict converted with diffusers' own converter),
same input, fp32, inference mode; on the CPU also both with their weights prepacked for
oneDNN (``model.weights.prepack``, what ``infer.py`` does on the CPU). Each measurement runs in a
fresh process so CPU peak memory is live tensor memory; CPU time is the process's CPU
time on one thread (wall time on a shared 2-core machine swings more than the
differences measured).

    python bench/unet.py [--sizes tiny sd15] [--iters 3]
"""

from __future__ import annotations

import argparse
import contextlib
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
    time_call,
)
from model.nets.unet import UNet  # noqa: E402
from model.weights.prepack import prepacked_weights  # noqa: E402
from tests.sd_layout import config  # noqa: E402

# size -> (unet config, batch, latent side)
SIZES = {"tiny": ("tiny", 2, 32), "sd15": ("sd15", 2, 32)}


def build(impl: str, size: str, device: str):
    """The UNet of ``impl`` ('ours' | 'diffusers') with shared random weights, and its call."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    name, batch, side = SIZES[size]
    params = config("unet", name)
    torch.manual_seed(0)
    ours = UNet(**params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, params["in_channels"], side, side, generator=gen)
    t = torch.tensor([500] * batch)
    context = torch.randn(batch, 77, params["context_dim"], generator=gen)
    if impl == "ours":
        model = ours
        call = lambda m, x: m(x, t.to(device), context.to(device))  # noqa: E731
    else:
        ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
        vae = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}
        cfg = {
            "model": {
                "params": {
                    "unet_config": {"params": {**params, "image_size": 64}},
                    "first_stage_config": {"params": vae},
                }
            }
        }
        dcfg = create_unet_diffusers_config_from_ldm(cfg, ldm)
        model = UNet2DConditionModel(**dcfg)
        model.load_state_dict(convert_ldm_unet_checkpoint(ldm, dcfg), strict=True)
        del ldm
        call = lambda m, x: m(x, t.to(device), encoder_hidden_states=context.to(device)).sample  # noqa: E731
    del ours
    model = model.to(device).eval()
    x = x.to(device)
    return model, lambda: call(model, x)


def worker(impl: str, size: str, device: str, prepacked: bool, iters: int) -> dict:
    clock = time.perf_counter
    if device == "cpu":
        torch.set_num_threads(1)  # CPU time on one thread repeats on a shared machine
        clock = time.process_time
        map_large_buffers_separately()  # so peak RSS follows live tensor memory
    model, fn = build(impl, size, device)
    packing = prepacked_weights(model) if prepacked else contextlib.nullcontext()
    with torch.inference_mode(), packing:
        memory = peak_memory_mib(fn, device, warmup=1)
        reuse_heap()
        seconds = time_call(fn, device, warmup=1, iters=iters, clock=clock)
    return {"time_s": seconds, "peak_mib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--worker", nargs=5, metavar=("IMPL", "SIZE", "DEVICE", "PACK", "ITERS"))
    args = parser.parse_args()
    if args.worker:
        impl, size, device, pack, iters = args.worker
        print(json.dumps(worker(impl, size, device, pack == "1", int(iters))))
        return
    rows = []
    for device in devices():
        for size in args.sizes:
            base = None
            variants = [("diffusers", "0"), ("ours", "0")]
            if device == "cpu":  # prepacking is for the CPU
                variants += [("ours", "1"), ("diffusers", "1")]
            for impl, pack in variants:
                r = run_worker(__file__, [impl, size, device, pack, str(args.iters)])
                base = base or r
                rows.append(
                    {
                        "device": device,
                        "size": size,
                        "impl": impl + (" prepacked" if pack == "1" else ""),
                        "forward s": f"{r['time_s']:.3f}",
                        "x diffusers": f"{r['time_s'] / base['time_s']:.2f}",
                        "peak MiB": f"{r['peak_mib']:.0f}",
                        "mem x diffusers": f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}",
                    }
                )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
