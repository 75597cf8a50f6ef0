"""Forward time and peak memory of our UNet vs diffusers' UNet2DConditionModel, and the CPU
fast paths tried on ours.

Same weights (a random SD-layout state dict converted with diffusers' own converter), same
input, fp32, inference mode. On the CPU each also runs with its weights prepacked for oneDNN
(``model.weights.prepack``): every layer (``prepack=true``) and the layers calibrated faster
so on this machine (``prepack=auto``, what ``infer.py`` does by default; calibrated on the
first call into a fresh cache, whose cost is the one-off column). Ours also runs in the
channels-last memory format, through ``torch.compile`` with inductor's freezing (compile
time in the one-off column), with SDPA's math kernel instead of the one it picks, and in
bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX; refused elsewhere).

Each measurement runs in a fresh process, so CPU peak memory is live tensor memory; on one
thread the time is the process's CPU time (steady on a shared machine), on more wall time;
the least of ``--iters`` calls after the first, and of ``--repeats`` processes run
interleaved (variant A, B, ..., A, B, ...).

    python bench/unet.py [--sizes tiny sd15] [--threads 1 2] [--iters 3] [--repeats 2]
                         [--variants ours:plain ours:prepack=auto ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    devices,
    machine_line,
    map_large_buffers_separately,
    peak_memory_mib,
    print_table,
    reuse_heap,
    run_worker,
    summary,
    time_call,
)
from model.editing.precision import cast_for_inference, native_bf16  # noqa: E402
from model.nets.unet import UNet  # noqa: E402
from model.weights.calibration import Calibration  # noqa: E402
from model.weights.prepack import prepacked_weights  # noqa: E402
from tests.sd_layout import config  # noqa: E402

# size -> (unet config, batch, latent side)
SIZES = {"tiny": ("tiny", 2, 32), "sd15": ("sd15", 2, 32)}
# (impl, variant) rows; the CPU-only ones are skipped on CUDA
VARIANTS = [
    ("diffusers", "plain"),
    ("ours", "plain"),
    ("ours", "prepack=true"),
    ("ours", "prepack=auto"),
    ("ours", "channels_last"),
    ("ours", "channels_last+prepack=auto"),
    ("ours", "compile"),
    ("ours", "sdpa=math"),
    ("ours", "bf16"),
    ("diffusers", "prepack=true"),
    ("diffusers", "prepack=auto"),
]
CPU_ONLY = {"prepack=true", "prepack=auto", "channels_last+prepack=auto", "bf16"}


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
    return model, x, call


def fast_path(model, x, call, variant: str, stack: contextlib.ExitStack):
    """The call of ``variant``, its contexts entered on ``stack``."""
    if "channels_last" in variant:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if "prepack=true" in variant:
        stack.enter_context(prepacked_weights(model))
    if "prepack=auto" in variant:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory()))  # calibrated afresh
        stack.enter_context(prepacked_weights(model, Calibration("UNet", root=root)))
    if variant == "compile":
        import torch._inductor.config as inductor

        inductor.freezing = True  # weights constant-folded and prepacked by the compiler
        model = torch.compile(model)
    if variant == "sdpa=math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    if variant == "bf16":
        cast_for_inference(model, torch.bfloat16)
        stack.enter_context(torch.autocast(x.device.type, dtype=torch.bfloat16))
    return lambda: call(model, x)


def worker(impl: str, size: str, device: str, variant: str, iters: int, threads: int) -> dict:
    clock = time.perf_counter
    if device == "cpu":
        torch.set_num_threads(threads)
        if threads == 1:
            clock = time.process_time  # CPU time on one thread repeats on a shared machine
        map_large_buffers_separately()  # so peak RSS follows live tensor memory
    if variant == "bf16" and device == "cpu" and not native_bf16():
        return {"refused": f"no native bf16 ({torch.backends.cpu.get_cpu_capability()})"}
    model, x, call = build(impl, size, device)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        fn = fast_path(model, x, call, variant, stack)
        first = time_call(fn, device, warmup=0, iters=1, clock=clock)  # calibrates / compiles
        memory = peak_memory_mib(fn, device)
        reuse_heap()
        seconds = min(time_call(fn, device, warmup=0, iters=1, clock=clock) for _ in range(iters))
    return {"time_s": seconds, "peak_mib": memory, "first_s": first}


def measure(args, variants) -> dict:
    """``repeats`` rounds over every (device, size, threads, variant), one fresh process each,
    interleaved (A B A B ...: a burst of load on a shared machine hits all alike); per key the
    least time, first-call time and peak memory seen, or the refusal."""
    results: dict[tuple, dict] = {}
    for _ in range(args.repeats):
        for device in devices():
            for size in args.sizes:
                for threads in args.threads if device == "cpu" else [0]:
                    for impl, variant in variants:
                        if device != "cpu" and variant in CPU_ONLY:
                            continue
                        key = (device, size, threads, impl, variant)
                        if "refused" in results.get(key, {}):
                            continue
                        worker_args = [impl, size, device, variant, args.iters, threads]
                        r = run_worker(__file__, [str(a) for a in worker_args])
                        print(json.dumps({"key": key, **r}), flush=True)  # as it comes
                        seen = results.setdefault(key, r)
                        for k in ("time_s", "first_s", "peak_mib"):
                            if k in r:
                                seen[k] = min(seen[k], r[k])
    return results


def rows_of(results: dict) -> list[dict]:
    """Table rows: ratios to diffusers plain and to ours plain of the same device, size and
    threads."""
    rows = []
    for (device, size, threads, impl, variant), r in results.items():
        row = {"device": device, "size": size, "threads": threads or ""}
        row |= {"impl": impl, "variant": variant}
        if "refused" in r:
            rows.append({**row, "note": "refused: " + r["refused"]})
            continue
        base = results.get((device, size, threads, "diffusers", "plain"), r)
        plain = results.get((device, size, threads, "ours", "plain"))
        rows.append(
            row
            | {
                "forward s": f"{r['time_s']:.3f}",
                "x diffusers": f"{r['time_s'] / base['time_s']:.2f}",
                "x ours plain": f"{r['time_s'] / plain['time_s']:.2f}" if plain else "",
                "one-off s": f"{max(r['first_s'] - r['time_s'], 0):.1f}",
                "peak MiB": f"{r['peak_mib']:.0f}",
                "mem x diffusers": f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--iters", type=int, default=3, help="timed calls per process")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of processes")
    parser.add_argument("--variants", nargs="+", help="impl:variant, e.g. ours:prepack=auto")
    parser.add_argument("--worker", nargs=6)
    args = parser.parse_args()
    if args.worker:
        impl, size, device, variant, iters, threads = args.worker
        print(json.dumps(worker(impl, size, device, variant, int(iters), int(threads))))
        return
    variants = [tuple(v.split(":", 1)) for v in args.variants] if args.variants else VARIANTS
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    print(machine_line(args.threads))
    rows = rows_of(measure(args, variants))
    columns = ["device", "size", "threads", "impl", "variant", "forward s", "x diffusers"]
    columns += ["x ours plain", "one-off s", "peak MiB", "mem x diffusers", "note"]
    print_table(rows, columns)
    print(f"least of {args.repeats} process(es) x {args.iters} call(s) each")
    print(machine_line(args.threads))


if __name__ == "__main__":
    main()
