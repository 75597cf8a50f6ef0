"""Batching: one-kind joint batches, seeded shuffling and workers, Lightning integration."""

import itertools
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from data.datamodule import (
    JointBatchSampler,
    SkippedFilesReport,
    VideoDataModule,
    collate_samples,
)
from data.datasets import VideoClipDataset
from data.io import write_video
from data.synthetic import SyntheticWorldDataset


@pytest.fixture(autouse=True)
def one_thread():
    """Render on one thread, as DataLoader workers do: small ops lose on a busy pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_joint_batches_are_one_kind_at_the_ratio_and_cover_the_clips():
    sampler = JointBatchSampler(num_videos=40, num_images=100, batch_size=4, image_ratio=0.6)
    batches = list(sampler.epoch_batches(0))
    assert len(batches) == sampler.steps_per_epoch == 10 + 15
    kinds = [all(i >= 40 for i in b) - all(i < 40 for i in b) for b in batches]
    assert kinds.count(1) == 15 and kinds.count(-1) == 10  # never mixed (0)
    clips = [i for b in batches for i in b if i < 40]
    assert sorted(clips) == list(range(40))  # each clip once per epoch
    assert kinds[:10] != [-1] * 10  # image steps are interleaved, not appended


def test_shuffling_is_seeded_and_changes_every_epoch():
    def make(seed):
        return JointBatchSampler(30, 30, batch_size=3, image_ratio=0.5, seed=seed)

    first, twin = make(7), make(7)
    epoch0, epoch1 = list(first.epoch_batches(0)), list(first.epoch_batches(1))
    assert epoch0 == list(twin.epoch_batches(0)) and epoch1 == list(twin.epoch_batches(1))
    assert epoch0 != epoch1 and epoch0 != list(make(8).epoch_batches(0))
    stream = list(itertools.islice(first, 2 * len(epoch0)))
    assert stream == epoch0 + epoch1  # the endless stream is the epochs in order


def test_stream_resumes_at_any_step():
    """Batch k depends on (seed, k) alone: starting at step k continues the stream."""

    def make(start):
        return JointBatchSampler(30, 30, batch_size=3, image_ratio=0.5, seed=7, start_step=start)

    whole = list(itertools.islice(make(0), 50))
    for start in (1, 19, 20, 33):
        assert list(itertools.islice(make(start), 50 - start)) == whole[start:]


def test_ranks_get_disjoint_slices_of_the_same_kind():
    ranks = [JointBatchSampler(32, 64, 2, 0.5, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    zero, one = (list(r.epoch_batches(0)) for r in ranks)
    assert len(zero) == len(one) == 8 + 8
    for a, b in zip(zero, one, strict=True):
        assert (a[0] < 32) == (b[0] < 32) and not set(a) & set(b)


def test_collate_stacks_optional_tensors_and_rejects_mixed_shapes():
    world = SyntheticWorldDataset(4, num_frames=3, size=32)
    batch = collate_samples([world[0], world[1]])
    assert batch["frames"].shape == (2, 3, 3, 32, 32) and batch["flow"].shape == (2, 2, 2, 32, 32)
    assert batch["is_video"].tolist() == [True, True] and len(batch["caption"]) == 2
    image = SyntheticWorldDataset(4, num_frames=1, size=32)[0]
    with pytest.raises(ValueError, match="cannot batch frames of shapes"):
        collate_samples([world[0], image])
    without_flow = dict(world[2])
    del without_flow["flow"]
    with pytest.raises(ValueError, match="'flow' is missing"):
        collate_samples([world[0], without_flow])


def test_datamodule_mixes_image_and_clip_batches():
    module = VideoDataModule(
        train_dataset=SyntheticWorldDataset(8, num_frames=4, size=32),
        val_dataset=SyntheticWorldDataset(3, num_frames=4, size=32, split="val"),
        image_dataset=SyntheticWorldDataset(8, num_frames=1, size=32),
        image_ratio=0.5,
        batch_size=2,
    )
    batches = list(itertools.islice(module.train_dataloader(), 8))  # the stream is endless
    shapes = sorted({tuple(b["frames"].shape) for b in batches})
    assert shapes == [(2, 1, 3, 32, 32), (2, 4, 3, 32, 32)]
    assert all(b["is_video"].all() == (b["frames"].shape[1] == 4) for b in batches)
    val = list(module.val_dataloader())
    assert [len(b["key"]) for b in val] == [2, 1] and val[0]["key"][0].startswith("world#1000")


class RandomItems(Dataset):
    """Items drawn from torch's RNG, as the video datasets draw starts and crops."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        frames = torch.rand(2, 3, 8, 8)
        return {"frames": frames, "caption": "", "is_video": True, "key": str(index)}


def test_worker_randomness_reproduces_from_the_seed():
    def draw(seed):
        module = VideoDataModule(RandomItems(), batch_size=4, num_workers=2, seed=seed)
        batches = list(itertools.islice(module.train_dataloader(), 4))
        return torch.cat([b["frames"] for b in batches]), [b["key"] for b in batches]

    (frames, _), (again, _), (other, _) = draw(3), draw(3), draw(4)
    assert torch.equal(frames, again) and not torch.equal(frames, other)


class RecordingModule(pl.LightningModule):
    """Records the keys of every training batch; a single parameter keeps Lightning going."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_index):
        self.keys.append(list(batch["key"]))
        return (batch["frames"].mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_shuffles_per_epoch_and_reports_skipped_files(tmp_path):
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    for k in range(4):
        write_video(tmp_path / f"clip{k}.mp4", frames + 30 * k, 10)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (tmp_path / "zero.mp4").write_bytes(b"")

    def fit():
        pl.seed_everything(1, verbose=False)  # the random starts come from torch's RNG
        dataset = VideoClipDataset(root=str(tmp_path), num_frames=2, size=64)
        datamodule = VideoDataModule(dataset, batch_size=2, seed=1)
        module, report = RecordingModule(), SkippedFilesReport()
        trainer = pl.Trainer(
            max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[report],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=datamodule)
        return module.keys, datamodule.skipped_files(), [str(w.message) for w in caught]

    keys, skipped, messages = fit()
    assert len(keys) == 6  # 6 entries // batch 2 = 3 steps per epoch of the stream
    assert keys[:3] != keys[3:]  # a new order in the second epoch
    assert skipped == {
        str(tmp_path / "corrupt.mp4"): "unreadable",
        str(tmp_path / "zero.mp4"): "empty",
    }
    report = [m for m in messages if "unreadable files skipped" in m]
    assert len(report) == 1 and "corrupt.mp4" in report[0] and "zero.mp4" in report[0]
    assert fit()[0] == keys  # the same seed replays the same run
