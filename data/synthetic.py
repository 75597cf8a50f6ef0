"""The procedural world as a dataset: textured primitives on a textured floor, seen by a
moving camera (scenes: ``data.world_scene``; rendering: ``data.world_render``).

Each clip comes with exact inverse depth (1 / camera z, 0 for the sky; MiDaS-like: larger is
nearer) and exact forward flow (where each pixel's surface point lands in the next frame, in
pixels), and a caption naming colours, patterns and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from data.video import parse_size
from data.world_render import render
from data.world_scene import SPLIT_OFFSETS, Scene, sample_scene


class SyntheticWorldDataset(Dataset):
    """``num_clips`` clips of the procedural world; clip i is fixed by (seed, split, i).

    Splits take disjoint seed ranges: scene seed = seed + SPLIT_OFFSETS[split] + i. ``speed``
    scales all motion per frame (2.0 looks like half the frame rate). Samples
    carry ``depth`` (inverse depth, 1 / camera z, 0 for sky) and, for F > 1, ``flow``.
    ``num_frames=1`` gives images (``is_video`` False) for joint image + video training.
    """

    carries_depth = True  # samples hold 'depth' (exact inverse depth); jobs.training checks it

    def __init__(
        self,
        num_clips: int = 1000,
        num_frames: int = 8,
        size: int | Sequence[int] = 64,
        seed: int = 0,
        split: str = "train",
        num_objects: int | Sequence[int] = (1, 3),
        speed: float = 1.0,
    ) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {tuple(SPLIT_OFFSETS)}, got {split!r}")
        if not 0 < num_clips <= 10**8:
            raise ValueError(f"num_clips must be in [1, 1e8], got {num_clips}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        low, high = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
        if not 1 <= low <= high:
            raise ValueError(
                f"num_objects must be n or (min, max) with 1 <= min <= max: {num_objects}"
            )
        self.num_clips, self.num_frames, self.size = num_clips, num_frames, parse_size(size)
        self.seed, self.split, self.num_objects, self.speed = (
            seed,
            split,
            (int(low), int(high)),
            speed,
        )

    def __len__(self) -> int:
        return self.num_clips

    def scene_seed(self, index: int) -> int:
        """The seed of clip ``index`` of this split."""
        return self.seed + SPLIT_OFFSETS[self.split] + index

    def scene(self, index: int) -> Scene:
        """The scene of clip ``index``."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range for {self.num_clips} clips")
        return sample_scene(self.scene_seed(index), self.num_frames, self.num_objects, self.speed)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        clip = render(scene, self.num_frames, self.size)
        height, width = self.size
        seen = [k - 1 for k in clip.surface.unique().tolist() if k > 0]
        sample = {
            "frames": clip.frames,
            "caption": scene.caption(seen),  # only the bodies the clip shows
            "is_video": self.num_frames > 1,
            "key": f"world#{self.scene_seed(index)}#{self.num_frames}x{height}x{width}",
            "depth": clip.inverse_depth,
        }
        if self.num_frames > 1:
            sample["flow"] = clip.flow
        return sample
