"""WebDataset shards: shard.py writes real clips and images (plain and encoded), the stream
splits them over ranks and workers, skips and counts corrupt samples, reads URLs, and
resumes exactly; training on shards resumes exactly; gen1_sd15 composes with them."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from data.shard_stream import JointShardStream
from data.shards import (
    EncodedShardClips,
    LaneReader,
    ShardClips,
    ShardIndex,
    lane_items,
    read_index,
)
from data.video import read_clip
from jobs.shards import run
from jobs.training import check_config, train
from tests.sd_layout import ROOT
from tests.test_train import config, image_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def shard(tmp: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("shard", overrides=[f"run_dir={tmp}", "num_workers=0", *overrides])
    cfg.trainer.enable_progress_bar = False
    cfg.trainer.enable_model_summary = False
    return run(cfg)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, video_folder) -> Path:
    """Plain shards of the test videos (2 good, a corrupt and an empty one) and 4 images,
    one sample per shard."""
    tmp = tmp_path_factory.mktemp("shards")
    images = image_folder(tmp / "images")
    (images / "image0.txt").write_text("a ramp")
    out = tmp / "plain"
    summary = shard(
        tmp,
        f"videos.root={video_folder}",
        f"images.root={images}",
        f"output={out}",
        "samples_per_shard=1",
    )
    assert summary["video"] == {"samples": 4, "shards": 4, "skipped": 0}  # bytes as they are
    assert summary["image"] == {"samples": 4, "shards": 4, "skipped": 0}
    return out


def test_plain_shards_hold_the_files_and_read_back(shards, video_folder):
    index = read_index(str(shards / "videos.json"))
    assert index.kind == "video" and not index.encoded and index.counts == (1, 1, 1, 1)
    assert all(Path(u).is_file() for u in index.urls)
    videos = ShardClips(str(shards / "videos.json"), num_frames=4, size=32, stride=1, train=False)
    reader = LaneReader(videos.index, 0, 1, seed=0, buffer=0)
    decoded = {}
    for _ in range(index.total):
        sample_id, raw = next(reader)
        try:
            decoded[sample_id] = videos.decode(raw, None)
        except Exception as err:
            decoded[sample_id] = type(err).__name__
    good = [s for s in decoded.values() if isinstance(s, dict)]
    assert sorted(decoded.values(), key=str).count("MediaReadError") == 2  # corrupt, empty
    expected = read_clip(video_folder / "good1.mp4", 4, 32, stride=1).frames
    (match,) = [s for s in good if s["key"].startswith(str(video_folder / "good1.mp4"))]
    assert torch.equal(match["frames"], expected)  # the same pixels as the folder dataset


def test_stream_skips_and_counts_corrupt_samples(shards):
    videos = ShardClips(str(shards / "videos.json"), num_frames=4, size=32, stride=1, shuffle=2)
    images = ShardClips(str(shards / "images.json"), size=32, shuffle=2)
    stream = JointShardStream(videos, images, image_ratio=0.5, batch_size=2, seed=0)
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(itertools.islice(iter(stream), 8))
    kinds = {tuple(b["frames"].shape[1:]) for b in batches}
    assert kinds == {(4, 3, 32, 32), (1, 3, 32, 32)}  # both kinds, each batch one kind
    assert sorted(videos.skipped.values()) == ["empty", "unreadable"]
    keys = {k.split("#")[0] for b in batches for k in b["key"]}
    assert {Path(k).name for k in keys} >= {"good0.mp4", "good1.mp4", "image0.png"}


def test_lanes_split_every_epoch_disjointly():
    index = ShardIndex("x.json", tuple(f"s{i}.tar" for i in range(7)), (3, 1, 4, 1, 5, 9, 2),
                       "video", False)  # fmt: skip
    for slots in (2, 4, 12):  # 12 > 7 shards: every lane reads every shard, keeps every 12th
        for epoch in (0, 1):
            parts = [lane_items(index, epoch, 0, slot, slots) for slot in range(slots)]
            joined = np.concatenate(parts)
            assert sorted(joined.tolist()) == list(range(index.total))
    assert not np.array_equal(lane_items(index, 0, 0, 0, 2), lane_items(index, 1, 0, 0, 2))
    # one shard, four lanes: each lane keeps every 4th sample, from an offset that moves
    # with the epoch (a lane whose share was one corrupt sample would otherwise never read)
    one = ShardIndex("x.json", ("s0.tar",), (4,), "video", False)
    seen = {int(lane_items(one, epoch, 0, 3, 4)[0]) for epoch in range(12)}
    assert len(seen) > 1


def sources(shards: Path):
    videos = ShardClips(f"{shards}/videos.json", 4, 32, stride=1, shuffle=3)
    images = ShardClips(f"{shards}/images.json", 1, 32, shuffle=3)
    return videos, images


def keys_of(batches) -> list[tuple]:
    return [(int(b["stream_state"][1]), tuple(b["key"])) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_from_recorded_positions(shards, workers):
    """Batches after step k are the same whether the stream ran on or restarted from the
    positions its batches carried (what the DataModule saves in the checkpoint)."""
    lanes = max(1, workers)

    def loader(start: int, states: dict) -> DataLoader:
        videos, images = sources(shards)
        stream = JointShardStream(videos, images, 0.5, 2, 0, 1, 2, lanes, start, states)
        return DataLoader(stream, batch_size=None, num_workers=workers)  # rank 1 of 2

    straight = list(itertools.islice(iter(loader(0, {})), 9))
    states = {}
    for batch in straight[:5]:  # trained on steps 0..4, then interrupted
        lane, *state = batch["stream_state"].tolist()
        states[lane] = state
    resumed = list(itertools.islice(iter(loader(5, states)), 4))
    assert keys_of(resumed) == keys_of(straight[5:])
    for a, b in zip(resumed, straight[5:], strict=True):
        assert torch.equal(a["frames"], b["frames"])


def test_urls_and_pipes_open_like_paths(shards):
    """An index read through ``pipe:cat`` with shards named by ``url_format``."""
    videos = ShardClips(f"pipe:cat {shards}/videos.json", 4, 32, stride=1, shuffle=3,
                        url_format=f"pipe:cat {shards}/{{shard}}")  # fmt: skip
    assert videos.index.urls[0].startswith("pipe:cat ")
    plain = sources(shards)[0]
    piped = list(itertools.islice(iter(JointShardStream(videos, None, 0.0, 2, 0)), 3))
    local = list(itertools.islice(iter(JointShardStream(plain, None, 0.0, 2, 0)), 3))
    assert [b["key"] for b in piped] == [b["key"] for b in local]


def test_truncated_shard_is_skipped_and_counted(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "videos.json").read_text())
    broken = copy / index["shards"][2]["url"]
    broken.write_bytes(broken.read_bytes()[:700])  # a header, then nothing
    videos = ShardClips(str(copy / "videos.json"), 4, 32, stride=1, shuffle=0)
    stream = JointShardStream(videos, None, 0.0, 1, 0)
    batches = list(itertools.islice(iter(stream), 4))
    assert len(batches) == 4
    assert f"{broken}#0" in videos.skipped


def test_encoded_shards_hold_the_encoders_outputs(tmp_path, video_folder):
    images = image_folder(tmp_path / "images")
    out = tmp_path / "encoded"
    summary = shard(
        tmp_path,
        f"videos.root={video_folder}",
        f"images.root={images}",
        f"output={out}",
        "encode=true",
        "model=tiny_world",
        "num_frames=4",
        "size=32",
        "stride=2",
        "keep_frames=true",
    )
    assert summary["video"] == {"samples": 2, "shards": 1, "skipped": 2}  # corrupt, empty
    skipped = json.loads((out / "skipped.json").read_text())["video"]
    assert sorted(Path(p).name for p in skipped) == ["corrupt.mp4", "empty.mp4"]
    clips = EncodedShardClips(str(out / "videos.json"), num_frames=4, size=32)
    batch = next(iter(JointShardStream(clips, None, 0.0, 2, 0)))
    assert batch["latent_mean"].shape == (2, 4, 4, 8, 8) and batch["depth"].shape == (2, 4, 1, 8, 8)
    assert batch["content"].shape == (2, 4, 32) and batch["frames"].shape == (2, 4, 3, 32, 32)
    # The stored posterior mean is the tiny VAE's moments of the clip (fp16).
    from data.encoded import build_encoders

    cfg = config(tmp_path, "model=tiny_world")
    vae = build_encoders(dict(cfg.model.vae), cfg.model.weights.vae, dict(cfg.model.clip))[0]
    source = batch["key"][0].split("@")[0]
    frames = read_clip(source, 4, 32, stride=2).frames
    with torch.no_grad():
        mean = vae.moments(frames)[0]
    assert torch.allclose(batch["latent_mean"][0], mean, atol=2e-3)
    with pytest.raises(ValueError, match="use data=shards_encoded"):
        ShardClips(str(out / "videos.json"))


def test_validation_shards_come_from_data_val(tmp_path, shards):
    """data.val names validation shards: every readable sample once, in order; unset, none."""
    from hydra.utils import instantiate

    common = ["data=shards", f"data.videos={shards}/videos.json", "data.size=32",
              "data.num_frames=4", "data.datamodule.num_workers=0"]  # fmt: skip
    cfg = config(tmp_path, *common, f"data.val={shards}/videos.json")
    datamodule = instantiate(cfg.data.datamodule)
    with pytest.warns(UserWarning, match="skipping"):
        batches = list(datamodule.val_dataloader())
    keys = [Path(k.split("#")[0].split("@")[0]).name for b in batches for k in b["key"]]
    assert sorted(keys) == ["good0.mp4", "good1.mp4"]  # the corrupt and empty one skipped
    assert batches[0]["frames"].shape[1:] == (4, 3, 32, 32)
    assert instantiate(config(tmp_path, *common).data.datamodule).val_dataloader() == []


@pytest.mark.slow
def test_training_on_shards_resumes_exactly(tmp_path, shards):
    """3 + 3 steps equal 6 straight, with joint image batches and two workers per rank."""
    common = [
        "experiment=tiny",
        "data=shards",
        f"data.videos={shards}/videos.json",
        f"data.images={shards}/images.json",
        "data.datamodule.image_ratio=0.5",
        "data.size=32",
        "data.num_frames=4",
        "data.datamodule.train_dataset.stride=1",
        "data.datamodule.num_workers=2",
        "data.datamodule.pin_memory=false",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.progress",
        "callbacks.checkpoint.every_n_train_steps=3",
    ]
    straight = train(config(tmp_path / "a", *common, "trainer.max_steps=6")).lightning_module
    train(config(tmp_path / "b", *common, "trainer.max_steps=3"))
    resumed = train(config(tmp_path / "b", *common, "trainer.max_steps=6", "ckpt_path=last"))
    a, b = straight.state_dict(), resumed.lightning_module.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert len(resumed.datamodule.skipped_files()) == 2


def test_gen1_sd15_composes_with_shards(tmp_path, shards):
    cfg = config(
        tmp_path,
        "experiment=gen1_sd15",
        "data=shards_encoded",
        f"data.videos={shards}/videos.json",
        f"data.images={shards}/images.json",
    )
    datamodule = cfg.data.datamodule
    assert datamodule._target_ == "data.shard_stream.ShardDataModule"
    assert datamodule.train_dataset._target_ == "data.shards.EncodedShardClips"
    assert datamodule.image_ratio == 0.3 and cfg.trainer.strategy.find_unused_parameters is False
    cfg.trainer.accelerator = "cpu"  # the GPU trainer is refused where there is no GPU
    check_config(cfg)  # encoded shards carry depth; the indexes exist
    missing = config(tmp_path, "experiment=gen1_sd15", "data=shards", "trainer.accelerator=cpu")
    with pytest.raises(ValueError, match="needs data.videos="):
        check_config(missing)


@pytest.mark.slow
def test_training_on_encoded_shards_without_frames(tmp_path, video_folder):
    """Shards of encoder outputs alone (no frames kept): a step runs the UNet only."""
    images = image_folder(tmp_path / "images")
    out = tmp_path / "encoded"
    shard(tmp_path, f"videos.root={video_folder}", f"images.root={images}", f"output={out}",
          "encode=true", "model=tiny_world", "num_frames=4", "size=32", "stride=2")  # fmt: skip
    trainer = train(
        config(
            tmp_path / "run",
            "experiment=tiny",
            "model=tiny_world",
            "data=shards_encoded",
            f"data.videos={out}/videos.json",
            f"data.images={out}/images.json",
            "data.datamodule.image_ratio=0.5",
            "data.num_frames=4",
            "data.datamodule.num_workers=0",
            "data.datamodule.pin_memory=false",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "~callbacks.progress",
        )
    )
    assert trainer.global_step == 3


@pytest.mark.slow
def test_precompute_runs_as_a_predict_job_on_two_processes(tmp_path, video_folder):
    """shard.py trainer=ddp on 2 CPU processes: each rank writes its share, rank 0 the index."""
    import os
    import subprocess
    import sys

    images = image_folder(tmp_path / "images")
    out = tmp_path / "encoded"
    overrides = [f"videos.root={video_folder}", f"images.root={images}", f"output={out}",
                 "encode=true", "model=tiny_world", "num_frames=4", "size=32", "stride=2",
                 "num_workers=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.precision=32-true", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "shard.py", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    videos, images_index = (
        read_index(str(out / "videos.json")),
        read_index(str(out / "images.json")),
    )
    assert videos.total == 2 and images_index.total == 4
    assert {Path(u).name.split("-")[1] for u in images_index.urls} == {"000", "001"}
    assert json.loads((out / "videos.json").read_text())["info"]["skipped"] == 2
