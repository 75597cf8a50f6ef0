"""Score Gen-1 edits of held-out procedural-world clips:
``python eval.py [mode=compare|sweep] [checkpoint=FILE] [key=value ...]``.

Composes ``configs/eval.yaml``. Clips come from ``SyntheticWorldDataset(split="test")``, with
exact depth, flow and surface ids. ``compare`` edits each clip four ways: with the video model
(guidance ``w_t``, all frames in one sampling run) and frame by frame with the image model
(each frame a 1-frame clip, so the temporal layers never run: Gen-1's ``mu^pi``), each from
independent noise per frame or from one shared noise for every frame (the "mov2mov" habit).
``sweep`` edits with the video model over ``w_t`` and over ``t_s``. Each output is scored
with ``model.metrics``; markdown tables, per-clip JSON and (sweep) PNG plots are written
atomically under ``output_dir``. A bad setting or a missing checkpoint is one line on stderr
and exit status 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.captions import world_pairs
from data.synthetic import SyntheticWorldDataset, render
from model.atomic import atomic_output, file_sha256
from model.checkpoint import CheckpointError
from model.editing import (
    EditSettings,
    check_settings,
    edit_video,
    image_content,
    settings_from_config,
    temporal_frame_limit,
    text_content,
    video_depth,
)
from model.gen1 import build_depth
from model.metrics import (
    flow_valid_mask,
    frame_consistency,
    prompt_consistency,
    sharpness,
    structure_fidelity,
    warp_error,
)
from model.prior import load_prior, prior_function
from model.prior_training import evaluate_prior
from model.release import default_noise_correlation, load_gen1

SETTINGS = {
    "video": "video model (w_t={w_t}, noise per frame)",
    "video_shared": "video model (w_t={w_t}, one shared noise)",
    "frames_independent": "frame by frame, image model, independent noise",
    "frames_shared": "frame by frame, image model, one shared noise",
}
INPUT_ROW = "input (unedited)"
METRICS = {  # key: (column title, higher is better; None: neither)
    "frame_consistency": ("frame consistency", True),
    "warp_error": ("warp error", False),
    "structure_fidelity": ("structure fidelity", False),
    "prompt_consistency": ("prompt consistency", True),
    "sharpness": ("sharpness", None),  # detail: falls as edits blur
}
SEED_STRIDE = 1000  # clip i's noise seeds: seed + 1000 i (+ frame k frame by frame)


class EvalError(Exception):
    """A bad setting or input, reported to the user as one line."""


def check_config(cfg: DictConfig) -> None:
    """Every choice and count in range, before anything is loaded."""
    choices = {
        "mode": ("compare", "sweep", "prompts"),
        "reference": ("other_clip", "own_clip"),
        "content": ("image", "prompt"),
        "structure": ("auto", "midas", "exact"),
        "fidelity_reference": ("midas", "exact"),
    }
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise EvalError(f"{key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    if cfg.num_clips < 1:
        raise EvalError(f"num_clips must be >= 1, got {cfg.num_clips}")
    if not 2 <= cfg.num_frames < SEED_STRIDE:
        raise EvalError(f"num_frames must be in [2, {SEED_STRIDE}), got {cfg.num_frames}")
    if not 0 <= cfg.reference_frame < cfg.num_frames:
        raise EvalError(f"reference_frame must be in [0, num_frames), got {cfg.reference_frame}")
    if (cfg.content == "prompt" or cfg.mode == "prompts") and not cfg.prompt:
        raise EvalError("content=prompt needs prompt=TEXT (or prompt=caption)")
    if cfg.mode == "prompts" and not Path(str(cfg.prior)).is_file():
        raise EvalError(
            f"mode=prompts needs prior=FILE (a model.prior_training export); not found: {cfg.prior}"
        )
    if cfg.mode == "sweep" and not (cfg.sweep.w_t and cfg.sweep.t_s):
        raise EvalError("sweep.w_t and sweep.t_s must each list at least one value")
    try:
        for w_t, t_s in [(cfg.w_t, cfg.t_s), *((w, cfg.t_s) for w in cfg.sweep.w_t)]:
            check_settings(edit_settings(cfg, w_t, t_s))
        for t_s in cfg.sweep.t_s:
            check_settings(edit_settings(cfg, cfg.w_t, t_s))
    except ValueError as err:
        raise EvalError(str(err)) from err


def edit_settings(cfg: DictConfig, w_t: float, t_s: int, **overrides) -> EditSettings:
    """The sampling settings of the config at temporal guidance ``w_t`` and fidelity ``t_s``
    (an unresolved ``noise_correlation`` as 0)."""
    base = {"noise_correlation": cfg.noise_correlation or 0.0}
    return settings_from_config(cfg, **{**base, "w_t": float(w_t), "t_s": int(t_s), **overrides})


def load_model(cfg: DictConfig, device: torch.device):
    """The Gen1 of ``cfg.checkpoint`` and the MiDaS that scores structure (``cfg.midas`` or
    the model's own), both on ``device``."""
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise EvalError(
            f"checkpoint not found: {path} (train and release the tiny-world model, or give "
            "checkpoint=FILE: a release .safetensors or a Lightning .ckpt)"
        )
    gen1 = load_gen1(path, use_ema=cfg.use_ema).to(device)
    midas = OmegaConf.to_container(cfg.midas)
    estimator = build_depth(midas) if midas.get("name") else gen1.depth
    if estimator is None:
        raise EvalError(
            f"{path} has no depth model, and structure fidelity needs one: give "
            "midas.name=NAME midas.weights=FILE"
        )
    try:
        check_settings(edit_settings(cfg, cfg.w_t, cfg.t_s), temporal_frame_limit(gen1.unet))
    except ValueError as err:
        raise EvalError(str(err)) from err
    return gen1, estimator.to(device)


@dataclass
class WorldClip:
    """A held-out clip with its exact geometry and the reference that sets its content."""

    index: int
    key: str
    caption: str
    frames: torch.Tensor  # (1, F, 3, H, W) in [-1, 1]
    depth: torch.Tensor  # (1, F, 1, H, W) exact inverse depth
    flow: torch.Tensor  # (F - 1, 2, H, W) forward flow in pixels
    valid: torch.Tensor  # (F - 1, H, W) pixels where the flow is exact and unoccluded
    reference_key: str
    reference_image: torch.Tensor  # (1, 3, H, W) the content image
    reference_caption: str


def _render(world: SyntheticWorldDataset, index: int):
    scene = world.scene(index)
    clip = render(scene, world.num_frames, world.size)
    seen = [k - 1 for k in clip.surface.unique().tolist() if k > 0]
    height, width = world.size
    key = f"world#{world.scene_seed(index)}#{world.num_frames}x{height}x{width}"  # as the dataset
    return clip, scene.caption(seen), key


def world_clips(cfg: DictConfig) -> Iterator[WorldClip]:
    """Clips ``0 .. num_clips - 1`` of the test split; other-clip references are clips
    ``num_clips + i`` (held out too, never edited)."""
    world = SyntheticWorldDataset(
        num_clips=2 * cfg.num_clips,
        num_frames=cfg.num_frames,
        size=cfg.size,
        seed=cfg.world_seed,
        split="test",
        speed=cfg.speed,
    )
    for i in range(cfg.num_clips):
        clip, caption, key = _render(world, i)
        ref, ref_caption, ref_key = clip, caption, key
        if cfg.reference == "other_clip":
            ref, ref_caption, ref_key = _render(world, cfg.num_clips + i)
        yield WorldClip(
            index=i,
            key=key,
            caption=caption,
            frames=clip.frames[None],
            depth=clip.inverse_depth[None],
            flow=clip.flow,
            valid=flow_valid_mask(clip.flow, clip.surface),
            reference_key=ref_key,
            reference_image=ref.frames[cfg.reference_frame][None],
            reference_caption=ref_caption,
        )


def prompt_of(cfg: DictConfig, clip: WorldClip) -> str | None:
    """The prompt of ``clip``: the configured text, or its reference's caption."""
    return clip.reference_caption if cfg.prompt == "caption" else cfg.prompt


class Editor:
    """Edits one clip with fixed content, conditioning depth and noise seeds."""

    def __init__(
        self, cfg: DictConfig, gen1, estimator, clip: WorldClip, content: torch.Tensor | None = None
    ) -> None:
        self.cfg, self.gen1, self.clip = cfg, gen1, clip
        self.midas_depth = video_depth(gen1, clip.frames, estimator, cfg.chunk_size)
        structure = cfg.structure
        if structure == "auto":
            structure = "midas" if gen1.depth is not None or cfg.midas.name else "exact"
        self.depth = clip.depth if structure == "exact" else self.midas_depth
        if content is not None:
            self.content = content
        elif cfg.content == "image":
            self.content = image_content(gen1, clip.reference_image)
        else:
            self.content = text_content(gen1, prompt_of(cfg, clip), mode="direct")
        self.seed = cfg.seed + SEED_STRIDE * clip.index

    def _edit(self, frames, depth, settings, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        result = edit_video(
            self.gen1, frames, self.content, settings, depth=depth, generator=generator
        )
        return result.frames[0]

    def video(self, w_t: float, t_s: int, noise_correlation: float | None = None) -> torch.Tensor:
        """The whole clip through the video model in one sampling run; its frames' noise
        correlates by ``noise_correlation`` (None: the config's; 1: one noise for all)."""
        extra = {} if noise_correlation is None else {"noise_correlation": noise_correlation}
        settings = edit_settings(self.cfg, w_t, t_s, **extra)
        return self._edit(self.clip.frames, self.depth, settings, self.seed)

    def frame_by_frame(self, t_s: int, shared_noise: bool) -> torch.Tensor:
        """Each frame edited alone as a 1-frame clip, so the UNet runs as the image model
        (temporal layers off, ``mu^pi``; ``w_t`` then changes nothing, and 1 costs the fewest
        passes). Its depth is normalised per frame, as an image model sees it. Frame k's noise
        seed is the clip's (``shared_noise``: the same noise for every frame) or the clip's + k.
        """
        settings = edit_settings(self.cfg, 1.0, t_s)
        frames = [
            self._edit(
                self.clip.frames[:, k : k + 1],
                self.depth[:, k : k + 1],
                settings,
                self.seed + (0 if shared_noise else k),
            )
            for k in range(self.clip.frames.shape[1])
        ]
        return torch.cat(frames)


class Scorer:
    """All metrics of one clip's outputs, against that clip's input and geometry."""

    def __init__(self, cfg: DictConfig, gen1, estimator, clip: WorldClip, midas_depth) -> None:
        self.cfg, self.gen1, self.estimator, self.clip = cfg, gen1, estimator, clip
        exact = cfg.fidelity_reference == "exact"
        self.depth_in = (clip.depth if exact else midas_depth)[0]
        self.prompt = prompt_of(cfg, clip)

    def __call__(self, frames: torch.Tensor) -> dict[str, float]:
        """Scores of output ``frames`` ``(F, 3, H, W)`` in [-1, 1]."""
        clip_net = self.gen1.clip
        depth_out = video_depth(self.gen1, frames[None], self.estimator, self.cfg.chunk_size)[0]
        scores = {
            "frame_consistency": frame_consistency(clip_net, frames),
            "warp_error": warp_error(frames, self.clip.flow, self.clip.valid),
            "structure_fidelity": structure_fidelity(self.depth_in, depth_out),
            "sharpness": sharpness(frames),
        }
        if self.prompt:
            scores["prompt_consistency"] = prompt_consistency(clip_net, frames, self.prompt)
        return scores


def mean_scores(records: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per row, each metric's mean over clips."""
    rows = records[0].keys()
    return {
        row: {m: sum(r[row][m] for r in records) / len(records) for m in records[0][row]}
        for row in rows
    }


def markdown_table(first_column: str, rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per entry of ``rows``, one column per metric present."""
    present = [m for m in METRICS if all(m in scores for scores in rows.values())]
    head = [first_column] + [METRICS[m][0] for m in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, scores in rows.items():
        lines.append("| " + " | ".join([name] + [f"{scores[m]:.4g}" for m in present]) + " |")
    higher = ", ".join(METRICS[m][0] for m in present if METRICS[m][1])
    lower = ", ".join(METRICS[m][0] for m in present if METRICS[m][1] is False)
    return "\n".join(lines) + f"\n\nHigher is better: {higher}. Lower is better: {lower}.\n"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it into place."""
    with atomic_output(path) as tmp:
        write(tmp)


def write_text(path: Path, text: str) -> None:
    """``text`` written atomically to ``path``."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def describe(cfg: DictConfig, seconds: float) -> dict:
    """What a result file records of the run: settings, checkpoint hash, timing."""
    return {
        "mode": cfg.mode,
        "checkpoint": {
            "path": str(Path(cfg.checkpoint).resolve()),
            "sha256": file_sha256(cfg.checkpoint),
        },  # fmt: skip
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "seconds": seconds,
        "torch": torch.__version__,
    }


def clip_record(clip: WorldClip) -> dict:
    """The identity of a clip and its reference in the per-clip JSON."""
    return {
        "index": clip.index,
        "key": clip.key,
        "caption": clip.caption,
        "reference": clip.reference_key,
        "reference_caption": clip.reference_caption,
    }


def run_compare(cfg: DictConfig, gen1, estimator, clips: list[WorldClip]) -> dict:
    """Scores of the input and of the four settings on every clip, and their means."""
    records, per_clip = [], []
    labels = {k: v.format(w_t=cfg.w_t) for k, v in SETTINGS.items()}
    for clip in tqdm(clips, desc="compare", disable=not cfg.progress):
        editor = Editor(cfg, gen1, estimator, clip)
        score = Scorer(cfg, gen1, estimator, clip, editor.midas_depth)
        outputs = {
            "video": lambda e=editor: e.video(cfg.w_t, cfg.t_s, noise_correlation=0.0),
            "video_shared": lambda e=editor: e.video(cfg.w_t, cfg.t_s, noise_correlation=1.0),
            "frames_independent": lambda e=editor: e.frame_by_frame(cfg.t_s, shared_noise=False),
            "frames_shared": lambda e=editor: e.frame_by_frame(cfg.t_s, shared_noise=True),
        }
        scores = {INPUT_ROW: score(clip.frames[0])}
        for name, make in outputs.items():
            scores[labels[name]] = score(make())
        records.append(scores)
        per_clip.append({**clip_record(clip), "scores": scores})
    means = mean_scores(records)
    return {"table": markdown_table("setting", means), "mean": means, "clips": per_clip}


def run_sweep(cfg: DictConfig, gen1, estimator, clips: list[WorldClip]) -> dict:
    """Video-model scores over ``sweep.w_t`` (at ``t_s``) and ``sweep.t_s`` (at ``w_t``)."""
    w_t0, t_s0 = float(cfg.w_t), int(cfg.t_s)
    grid = [("w_t", float(v), t_s0) for v in cfg.sweep.w_t]
    grid += [("t_s", int(v), w_t0) for v in cfg.sweep.t_s]
    by_w_t, by_t_s, per_clip = [], [], []
    for clip in tqdm(clips, desc="sweep", disable=not cfg.progress):
        editor = Editor(cfg, gen1, estimator, clip)
        score = Scorer(cfg, gen1, estimator, clip, editor.midas_depth)
        done: dict[tuple[float, int], dict[str, float]] = {}  # (w_t, t_s) -> scores
        for axis, value, other in grid:
            w_t, t_s = (value, other) if axis == "w_t" else (other, value)
            if (w_t, t_s) not in done:
                done[(w_t, t_s)] = score(editor.video(w_t, t_s))
        by_w_t.append({f"{float(v):g}": done[(float(v), t_s0)] for v in cfg.sweep.w_t})
        by_t_s.append({f"{int(v)}": done[(w_t0, int(v))] for v in cfg.sweep.t_s})
        per_clip.append(
            {**clip_record(clip), "w_t": by_w_t[-1], "t_s": by_t_s[-1]}  # keys: sweep values
        )
    w_t_means, t_s_means = mean_scores(by_w_t), mean_scores(by_t_s)
    table = (
        f"### Temporal guidance w_t (t_s={cfg.t_s})\n\n{markdown_table('w_t', w_t_means)}\n"
        f"### Structure fidelity t_s (w_t={cfg.w_t:g})\n\n{markdown_table('t_s', t_s_means)}"
    )
    return {
        "table": table,
        "mean": {"w_t": w_t_means, "t_s": t_s_means},
        "clips": per_clip,
        "figures": {
            "sweep_w_t.png": plot_sweep(by_w_t, "w_t", ("frame_consistency", "warp_error")),
            "sweep_t_s.png": plot_sweep(by_t_s, "t_s", ("structure_fidelity", "sharpness")),
        },
    }


def run_prompts(cfg: DictConfig, gen1, estimator, clips: list[WorldClip]) -> dict:
    """Text prompts two ways: through the prior (``prompt_mode=prior``) and as the raw CLIP
    text embedding (``direct``). Edits each clip from its prompt both ways (video model) and
    scores them; also the prior's embeddings against the true image embeddings of held-out
    (caption, frame) pairs of the world."""
    prior = load_prior(cfg.prior)
    to_image = prior_function(prior, seed=cfg.seed, num_candidates=cfg.prior_candidates)
    records, per_clip = [], []
    for clip in tqdm(clips, desc="prompts", disable=not cfg.progress):
        prompt = prompt_of(cfg, clip)
        contents = {
            "prior": text_content(gen1, prompt, mode="prior", prior=to_image),
            "direct": text_content(gen1, prompt, mode="direct"),
        }
        scores = {}
        for mode, content in contents.items():
            editor = Editor(cfg, gen1, estimator, clip, content=content)
            score = Scorer(cfg, gen1, estimator, clip, editor.midas_depth)
            scores[f"prompt_mode={mode}"] = score(editor.video(cfg.w_t, cfg.t_s))
        records.append(scores)
        per_clip.append({**clip_record(clip), "prompt": prompt, "scores": scores})
    means = mean_scores(records)
    text, images = world_pairs(
        gen1.clip, num_clips=cfg.prior_pairs, size=cfg.size, split="test", progress=cfg.progress
    )
    embeddings = evaluate_prior(
        prior.to(text.device), text, images, seed=cfg.seed, num_candidates=cfg.prior_candidates
    )
    table = (
        f"### Edits from prompts ({len(clips)} held-out clips)\n\n"
        f"{markdown_table('content', means)}\n"
        f"### Embeddings ({embeddings['count']} held-out caption-frame pairs)\n\n"
        "| embedding | mean cosine with the true image embedding |\n|---|---|\n"
        f"| prior sample | {embeddings['cos_prior']:.4f} |\n"
        f"| raw text | {embeddings['cos_text']:.4f} |\n"
    )
    return {"table": table, "mean": means, "embeddings": embeddings, "clips": per_clip}


def plot_sweep(records: list[dict[str, dict[str, float]]], axis: str, metrics) -> Figure:
    """One panel per metric: its mean over clips (+- one standard deviation) against ``axis``."""
    figure = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    values = list(records[0])
    xs = [float(v) for v in values]
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for panel, metric in zip(panels, metrics, strict=True):
        per_value = torch.tensor([[r[v][metric] for r in records] for v in values])
        means, stds = per_value.mean(1), per_value.std(1, correction=0)
        panel.errorbar(xs, means.tolist(), yerr=stds.tolist(), marker="o", capsize=3)
        title, higher = METRICS[metric]
        better = {True: " (higher is better)", False: " (lower is better)", None: ""}[higher]
        panel.set_title(title + better)
        panel.set_xlabel(axis)
        panel.set_xticks(xs)
        panel.grid(alpha=0.3)
    figure.suptitle(f"Gen-1 edits of {len(records)} held-out world clips vs {axis}")
    return figure


def _device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device={cfg.device}: no CUDA device is available")
    return device


def run(cfg: DictConfig) -> dict:
    """Evaluate per ``cfg.mode``; write the table, the JSON and (sweep) the plots; returns
    the result (``table``, ``mean``, ``clips``, ``files``)."""
    started = time.perf_counter()
    check_config(cfg)
    if cfg.noise_correlation is None and Path(cfg.checkpoint).is_file():
        cfg.noise_correlation = default_noise_correlation(cfg.checkpoint)
    gen1, estimator = load_model(cfg, _device(cfg))
    clips = list(world_clips(cfg))
    try:
        modes = {"compare": run_compare, "sweep": run_sweep, "prompts": run_prompts}
        result = modes[cfg.mode](cfg, gen1, estimator, clips)
    except ValueError as err:  # settings the model cannot take (e.g. a size the VAE cannot)
        raise EvalError(str(err)) from err
    figures = result.pop("figures", {})
    out = Path(cfg.output_dir)
    report = {**describe(cfg, time.perf_counter() - started), **result}
    files = {out / f"{cfg.mode}.json": json.dumps(report, indent=2) + "\n"}
    files[out / f"{cfg.mode}.md"] = f"# eval.py mode={cfg.mode}\n\n{result['table']}"
    for path, text in files.items():
        write_text(path, text)
    for name, figure in figures.items():
        write_atomic(out / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=110))
    return {**report, "files": [str(p) for p in [*files, *(out / n for n in figures)]]}


def cli(cfg: DictConfig) -> int:
    """Run; print the table. A bad setting or checkpoint is one line on stderr, status 1."""
    try:
        outcome = run(cfg)
    except (EvalError, CheckpointError, FileNotFoundError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 1
    print(outcome["table"])
    print(f"wrote {', '.join(outcome['files'])} ({outcome['seconds']:.1f} s)")
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    code = cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
