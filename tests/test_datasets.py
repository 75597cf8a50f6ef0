"""Video and image datasets: folders, manifests, captions, and skipping unreadable files."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.datasets import ImageDataset, SkippedMediaWarning, VideoClipDataset, read_manifest
from data.io import write_video


def moving_square(num_frames: int, height: int, width: int, shade: int) -> np.ndarray:
    frames = np.full((num_frames, height, width, 3), shade, np.uint8)
    for i in range(num_frames):
        frames[i, 8:24, 2 * i : 2 * i + 16] = 255 - shade
    return frames


@pytest.fixture()
def folder(tmp_path):
    """Three good videos (one captioned), a corrupt one and a zero-byte one."""
    for k, (height, width) in enumerate([(64, 96), (72, 72), (64, 128)]):
        write_video(tmp_path / f"good{k}.mp4", moving_square(20, height, width, 40 * k), 10)
    (tmp_path / "good0.txt").write_text("a square slides right\n")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    (tmp_path / "zero.mp4").write_bytes(b"")
    return tmp_path


def test_bad_files_are_skipped_warned_once_and_reported(folder):
    dataset = VideoClipDataset(root=str(folder), num_frames=4, size=64, stride=2)
    assert len(dataset) == 5
    with pytest.warns(SkippedMediaWarning) as record:
        items = [dataset[i] for i in range(len(dataset))]
    assert all(item["frames"].shape == (4, 3, 64, 64) for item in items)
    assert all(item["is_video"] and "good" in item["key"] for item in items)
    assert dataset.skipped == {
        str(folder / "corrupt.mp4"): "unreadable",
        str(folder / "zero.mp4"): "empty",
    }
    messages = [str(w.message) for w in record]
    assert sorted(m.split(":")[0].removeprefix("skipping ") for m in messages) == sorted(
        dataset.skipped
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second epoch warns about nothing
        for i in range(len(dataset)):
            dataset[i]


def test_skips_found_in_worker_processes_reach_the_main_process(folder):
    dataset = VideoClipDataset(root=str(folder), num_frames=4, size=64, stride=2)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [item["key"] for item in loader]
    assert len(keys) == 5 and all("good" in k for k in keys)
    assert set(dataset.skipped) == {str(folder / "corrupt.mp4"), str(folder / "zero.mp4")}


def test_a_folder_of_only_bad_files_raises_naming_it(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    dataset = VideoClipDataset(root=str(tmp_path), num_frames=2, size=64)
    with pytest.warns(SkippedMediaWarning), pytest.raises(RuntimeError, match=str(tmp_path)):
        dataset[0]


def test_captions_keys_and_deterministic_validation(folder):
    dataset = VideoClipDataset(root=str(folder), num_frames=4, size=64, fps=5, train=False)
    index = {Path(entry.path).name: i for i, entry in enumerate(dataset.entries)}
    first, again = dataset[index["good0.mp4"]], dataset[index["good0.mp4"]]
    assert first["caption"] == "a square slides right"
    assert dataset[index["good1.mp4"]]["caption"] == ""
    assert first["key"] == f"{folder / 'good0.mp4'}#0"
    assert torch.equal(first["frames"], again["frames"])
    train = VideoClipDataset(root=str(folder), num_frames=4, size=64, train=True)
    torch.manual_seed(0)
    reads = [train[index["good2.mp4"]] for _ in range(8)]  # 64x128 source: random start, crop
    assert len({item["key"] for item in reads}) > 1
    assert len({item["frames"].sum().item() for item in reads}) > 1


def test_csv_and_jsonl_manifests_with_segments(folder):
    (folder / "list.csv").write_text(
        f"path,caption,start,end\ngood1.mp4,a grey square,1.0,1.8\n{folder / 'good2.mp4'},,,\n"
    )
    rows = [{"path": "good1.mp4", "caption": "a grey square", "start": 1.0, "end": 1.8},
            {"path": str(folder / "good2.mp4")}]  # fmt: skip
    (folder / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("list.csv", "list.jsonl"):
        dataset = VideoClipDataset(manifest=str(folder / name), num_frames=4, size=64, train=False)
        assert len(dataset) == 2
        assert dataset[0]["caption"] == "a grey square" and dataset[1]["caption"] == ""
        assert dataset[0]["key"] == f"{folder / 'good1.mp4'}#10"  # 1.0 s at 10 fps
        torch.manual_seed(0)
        dataset.train = True
        starts = {int(dataset[0]["key"].split("#")[1]) for _ in range(10)}
        assert min(starts) >= 10 and max(starts) + 3 < 18


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", "file,caption\nx.mp4,cap\n", "a.csv, line 2: every entry needs a 'path'"),
        ("b.jsonl", '{"path": "x.mp4"}\n{oops\n', "b.jsonl, line 2: not JSON"),
        ("c.csv", "path,start,end\nx.mp4,2,1\n", "c.csv, line 2: 'end'"),
        ("d.csv", "path,start\nx.mp4,soon\n", "d.csv, line 2: 'start' must be seconds"),
        ("e.txt", "path\nx.mp4\n", "must end in .csv or .jsonl"),
    ],
)
def test_manifest_errors_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / name)


def test_images_are_one_frame_videos_with_sidecar_captions(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "astronaut.png")
    (tmp_path / "astronaut.txt").write_text("an astronaut")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    dataset = ImageDataset(root=str(tmp_path), size=(64, 128), train=False)
    with pytest.warns(SkippedMediaWarning, match="broken.png"):
        items = [dataset[i] for i in range(len(dataset))]
    assert all(s["frames"].shape == (1, 3, 64, 128) and not s["is_video"] for s in items)
    assert [s["caption"] for s in items] == ["an astronaut", "", ""]  # broken -> next one
    assert dataset.skipped == {str(tmp_path / "broken.png"): "unreadable"}
    assert items[0]["frames"].std() > 0.1  # a photo, not a blank


def test_constructor_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="exactly one of root= or manifest="):
        VideoClipDataset(num_frames=2, size=64)
    with pytest.raises(ValueError, match="no files with extensions"):
        VideoClipDataset(root=str(tmp_path), num_frames=2, size=64)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageDataset(root=str(tmp_path / "nowhere"), size=64)
