"""FSDP, as far as a CPU tests it (Lightning runs FSDPStrategy on GPUs only; bench/gpu.py runs
``train.py trainer=fsdp``): the trainer config builds the policy, the policy makes units of
the UNet, its blocks and temporal layers (the EMA copy's alike) and of no encoder, and two
gloo processes sharding a tiny Gen-1 the way Lightning wraps it train (clips, images, EMA,
clipping) to the weights one process reaches, saved as one full state dict that a plain
Gen1 loads strictly and ``release.py`` turns into a release."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from pytorch_lightning.strategies.strategy import _ForwardRedirection

from data.datamodule import collate_samples
from data.synthetic import SyntheticWorldDataset
from jobs.training import build_model
from model.diffusion.noise import SampleDraws, sample_seed
from model.nets.blocks import TimestepEmbedSequential
from model.nets.temporal import TemporalAttention, TemporalConv
from model.nets.unet import UNet
from model.training.loading import load_gen1, release_from_checkpoint
from model.training.parallel import frozen_encoders, wrap_policy
from tests.test_train import config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_gen1(run_dir, checkpointing: bool = False):
    torch.manual_seed(0)
    cfg = config(run_dir, "experiment=tiny", f"model.unet.use_checkpoint={checkpointing}")
    return build_model(cfg.model).train()


def global_batches() -> list[dict]:
    """Clips, images, clips: four samples each (2 per rank on two ranks)."""
    clips = SyntheticWorldDataset(num_clips=8, num_frames=4, size=32)
    images = SyntheticWorldDataset(num_clips=4, num_frames=1, size=32)
    return [
        collate_samples([clips[i] for i in range(4)]),
        collate_samples([images[i] for i in range(4)]),
        collate_samples([clips[i] for i in range(4, 8)]),
    ]


def train_steps(model, gen1, rank: int = 0, world: int = 1) -> list[bool]:
    """Steps on this rank's share of each global batch (loss through the FSDP root's forward,
    as Lightning redirects training_step), clipping, then the EMA update; whether the
    temporal layers had no gradient after each step's backward.

    SGD with momentum and weight decay: like AdamW it moves a weight whose gradient is zero
    rather than None, but it does not turn fp noise in a near-zero gradient into a whole
    step (AdamW's first step is lr * sign(g)), so sharded and whole runs compare closely.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = isinstance(model, FullyShardedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    no_temporal_gradient = []
    for step, batch in enumerate(global_batches()):
        b = batch["frames"].shape[0] // world
        local = {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}
        draws = SampleDraws([sample_seed(0, step, rank * b + j) for j in range(b)])
        if sharded:
            loss, _ = _ForwardRedirection()(model, gen1, "loss", local, gen1.unet, draws)
        else:
            loss, _ = gen1.loss(local, gen1.unet, draws)
        loss.backward()
        no_temporal_gradient.append(all(p.grad is None for p in gen1.unet.temporal_parameters()))
        if sharded:
            model.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gen1.ema.update(gen1.unet)
    return no_temporal_gradient


def fsdp_worker(rank: int, world: int, run_dir, port: int, checkpointing: bool) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen1 = tiny_gen1(run_dir / f"rank{rank}", checkpointing)
    model = FSDP(
        gen1,
        auto_wrap_policy=wrap_policy(),
        use_orig_params=True,
        ignored_modules=frozen_encoders(gen1),  # as Gen1FSDPStrategy does
        device_id=torch.device("cpu"),
    )
    units = sorted({type(m.module).__name__ for m in model.modules() if isinstance(m, FSDP)})
    no_temporal_gradient = train_steps(model, gen1, rank, world)
    full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
        state = model.state_dict()
    if rank == 0:
        saved = {"state": state, "units": units, "no_temporal_gradient": no_temporal_gradient}
        torch.save(saved, run_dir / "fsdp.pt")
    dist.destroy_process_group()


def test_fsdp_trainer_config_builds_the_policy(tmp_path):
    strategy = config(tmp_path, "trainer=fsdp").trainer.strategy
    assert strategy.use_orig_params and strategy.state_dict_type == "full"
    assert strategy._target_ == "model.training.parallel.Gen1FSDPStrategy"
    policy = instantiate(strategy.auto_wrap_policy)
    gen1 = tiny_gen1(tmp_path)
    selected = [name for name, m in gen1.named_modules() if policy(m, recurse=False)]
    expected = (UNet, TimestepEmbedSequential, TemporalConv, TemporalAttention)
    assert selected and all(isinstance(gen1.get_submodule(n), expected) for n in selected)
    assert {"unet", "ema.model"} <= set(selected)  # stem and head in a unit of their own
    blocks = [n for n in selected if isinstance(gen1.get_submodule(n), TimestepEmbedSequential)]
    unet_blocks = len(gen1.unet.input_blocks) + 1 + len(gen1.unet.output_blocks)
    assert len(blocks) == 2 * unet_blocks  # the UNet's and the EMA copy's
    temporal = [n for n in selected if ".temporal" in n]
    assert temporal and all(n.endswith(".temporal") for n in temporal)
    assert not [n for n in selected if n.startswith(("vae", "clip", "depth"))]


@pytest.mark.parametrize(
    "checkpointing",
    [pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)],
    ids=["plain", "ckpt"],
)
def test_fsdp_on_two_cpu_processes_trains_like_one(tmp_path, checkpointing):
    port = 29600 + os.getpid() % 300 + int(checkpointing)
    mp.spawn(fsdp_worker, (2, tmp_path, port, checkpointing), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert set(sharded["units"]) == {"UNet", "TimestepEmbedSequential", "TemporalConv",
                                     "TemporalAttention", "Gen1"}  # fmt: skip
    # The image step (1) leaves the temporal layers without gradient, as in one process.
    assert sharded["no_temporal_gradient"] == [False, True, False]
    gen1 = tiny_gen1(tmp_path / "one", checkpointing)
    assert train_steps(gen1, gen1) == [False, True, False]
    reference = gen1.state_dict()
    assert sharded["state"].keys() == reference.keys()  # one plain file, by Gen1's own keys
    for key, value in reference.items():
        torch.testing.assert_close(sharded["state"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    assert not torch.equal(reference["ema.model.out.2.weight"], reference["unet.out.2.weight"])
    # A single process resumes from it, and release.py reads it as a training checkpoint.
    checkpoint = tmp_path / "fsdp.ckpt"
    torch.save({"state_dict": sharded["state"], "hyper_parameters": dict(gen1.hparams)}, checkpoint)
    tiny_gen1(tmp_path / "resume").load_state_dict(sharded["state"], strict=True)
    release_from_checkpoint(checkpoint, tmp_path / "gen1.safetensors")
    released = load_gen1(tmp_path / "gen1.safetensors")
    torch.testing.assert_close(
        released.unet.out[2].weight.float(), reference["ema.model.out.2.weight"], atol=1e-3, rtol=0
    )
