"""``eval.py mode=methods``: every editing method on the same held-out world clips, prompts
and seeds, on the tiny SD (an image model) and on the Gen-1 tiny world model (its image model
frame by frame, and its video model), at each camera speed; a table, a CSV and a plot."""

from __future__ import annotations

import io

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from jobs.evaluation.clips import WorldClip, prompt_of, world_clips
from jobs.evaluation.measure import measured, unmap_freed_buffers
from jobs.evaluation.reports import METRICS, clip_record, mean_scores
from jobs.evaluation.scoring import Scorer
from jobs.evaluation.settings import SEED_STRIDE, EvalError, edit_settings
from model.editing.content import text_content
from model.editing.pipeline import edit_video, video_depth
from model.encoders.prior import load_prior, prior_function
from model.sd.loading import load_sd

COSTS = {"seconds_per_frame": "s / frame", "peak_mib": "peak MiB"}


def _editor(cfg: DictConfig, model, clip: WorldClip, content, depth):
    """``edit(method) -> (frames (F, 3, H, W), cost)``: one clip, one model, one content and
    one seed for every method."""
    seed = cfg.seed + SEED_STRIDE * clip.index
    device = next(model.sampling_unet().parameters()).device

    def edit(method: str):
        settings = edit_settings(
            cfg, cfg.w_t, cfg.t_s, method=method, steps=cfg.methods.steps,
            strength=cfg.methods.strength,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        result, cost = measured(
            lambda: edit_video(model, clip.frames, content, settings, depth=depth,
                               generator=generator),
            device,
        )  # fmt: skip
        frames = result.frames[0]
        return frames, {**cost, "seconds_per_frame": cost["seconds"] / frames.shape[0]}

    return edit


def _models(cfg: DictConfig, gen1) -> dict:
    """``label -> (model, methods)`` of the comparison."""
    sd = load_sd(cfg.methods.sd_checkpoint).to(next(gen1.parameters()).device)
    return {
        "tiny SD": (sd, list(cfg.methods.image)),
        "Gen-1 tiny": (gen1, [*cfg.methods.image, "gen1"]),
    }


def run_methods(cfg: DictConfig, gen1, estimator, _clips=None) -> dict:
    """Scores and costs of every (model, method) on every clip at every speed, their means,
    the tables and the plot."""
    if cfg.prompt is None:
        raise EvalError("mode=methods edits from prompts: set prompt=TEXT or prompt=caption")
    models = _models(cfg, gen1)
    unmap_freed_buffers()
    warmed: set[str] = set()  # a first edit also faults in code pages: not the model's cost
    to_image = prior_function(load_prior(cfg.prior), seed=cfg.seed,
                              num_candidates=cfg.prior_candidates)  # fmt: skip
    means, per_clip = {}, []
    with open_dict(cfg):
        cfg.num_clips = int(cfg.methods.num_clips)
    for speed in cfg.methods.speeds:
        with open_dict(cfg):
            cfg.speed = float(speed)
        records = []
        for clip in tqdm(
            list(world_clips(cfg)), desc=f"methods x{speed:g}", disable=not cfg.progress
        ):
            prompt = prompt_of(cfg, clip)
            depth = video_depth(gen1, clip.frames, estimator, cfg.chunk_size)
            score = Scorer(cfg, gen1, estimator, clip, depth)
            scores = {}
            for label, (model, methods) in models.items():
                if model is gen1:
                    content = text_content(gen1, prompt, mode="prior", prior=to_image)
                else:
                    content = model.encode_prompt(prompt, "")
                edit = _editor(cfg, model, clip, content, depth if model.uses_depth else None)
                if label not in warmed:
                    edit(methods[0])
                    warmed.add(label)
                for method in methods:
                    frames, cost = edit(method)
                    scores[f"{label} / {method}"] = {**score(frames), **cost}
            records.append(scores)
            per_clip.append({**clip_record(clip), "speed": float(speed), "prompt": prompt,
                             "scores": scores})  # fmt: skip
        means[f"{float(speed):g}"] = mean_scores(records)
    return {
        "table": methods_tables(cfg, means),
        "mean": means,
        "clips": per_clip,
        "texts": {"methods.csv": methods_csv(means)},
        "figures": {"methods.png": plot_methods(means)},
    }


def _columns(rows: dict) -> list[str]:
    first = next(iter(rows.values()))
    return [m for m in [*METRICS, *COSTS] if m in first and m != "sharpness"]


def methods_tables(cfg: DictConfig, means: dict) -> str:
    """One markdown table per speed; the best training-free value of each metric in bold."""
    out = []
    titles = {**{k: v[0] for k, v in METRICS.items()}, **COSTS}
    for speed, rows in means.items():
        columns = _columns(rows)
        out.append(f"### Camera speed x{speed}\n")
        out.append("| model / method | " + " | ".join(titles[c] for c in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for name, scores in rows.items():
            out.append(f"| {name} | " + " | ".join(f"{scores[c]:.4g}" for c in columns) + " |")
        out.append("")
    settings = (
        f"{len(next(iter(means.values())))} settings; {cfg.num_clips} clips x {cfg.num_frames} "
        f"frames at {cfg.size} px per speed; {cfg.methods.steps} {cfg.sampler} steps at "
        f"strength {cfg.methods.strength:g}, w {cfg.w:g}, t_s {cfg.t_s}; seconds are process "
        "CPU time."
    )
    best = strongest_training_free(means)
    return "\n".join(out) + (
        f"\n{settings} Higher is better: frame consistency, prompt consistency. Lower is "
        f"better: warp error, structure fidelity. Lowest warp error without training: {best}.\n"
    )


def methods_csv(means: dict) -> str:
    """Every (speed, model, method) row with every metric, as CSV."""
    rows = next(iter(means.values()))
    columns = _columns(rows)
    buffer = io.StringIO()
    buffer.write("speed,model,method," + ",".join(columns) + "\n")
    for speed, rows in means.items():
        for name, scores in rows.items():
            model, method = name.split(" / ")
            values = ",".join(f"{scores[c]:.6g}" for c in columns)
            buffer.write(f"{speed},{model},{method},{values}\n")
    return buffer.getvalue()


def plot_methods(means: dict) -> Figure:
    """Per speed, warp error against structure fidelity of every (model, method): the
    lower left corner is consistent and faithful."""
    figure = Figure(figsize=(5.2 * len(means), 4.2), layout="constrained")
    panels = figure.subplots(1, len(means), squeeze=False)[0]
    colours = {"tiny SD": "tab:blue", "Gen-1 tiny": "tab:red"}
    for panel, (speed, rows) in zip(panels, means.items(), strict=True):
        points: dict[tuple, list[str]] = {}  # identical results share one point and label
        for name, scores in rows.items():
            model, method = name.split(" / ")
            xy = (scores["structure_fidelity"], scores["warp_error"])
            points.setdefault((model, *xy), []).append(method)
        for (model, x, y), methods in points.items():
            marker = "*" if "gen1" in methods else "o"
            panel.scatter([x], [y], color=colours.get(model, "k"), marker=marker,
                          s=120 if marker == "*" else 36)  # fmt: skip
            label = " =\n".join(methods)
            text = panel.annotate(label, (x, y), fontsize=6.5, xytext=(4, -2),
                                  textcoords="offset points", va="top")  # fmt: skip
            text.set_in_layout(False)  # labels never squeeze the panels
        panel.margins(x=0.45, y=0.2)
        panel.set_xlabel("structure fidelity error (lower is better)")
        panel.set_ylabel("warp error (lower is better)")
        panel.set_yscale("log")
        panel.set_title(f"camera speed x{speed}")
        panel.grid(alpha=0.3)
    for model, colour in colours.items():
        panels[0].scatter([], [], color=colour, label=model)
    panels[0].legend(fontsize=8, loc="best")
    figure.suptitle("Editing methods on held-out world clips (star: the trained video model)")
    return figure


def strongest_training_free(means: dict) -> str:
    """The training-free (model, method) of the lowest mean warp error over speeds."""
    names = [n for n in next(iter(means.values())) if not n.endswith("/ gen1")]
    return min(names, key=lambda n: sum(r[n]["warp_error"] for r in means.values()))
