"""``eval.py mode=methods``: every editing method on the same held-out world clips, prompts
and seeds, on the tiny SD (an image model), on the tiny SD with its depth ControlNet, and on
the Gen-1 tiny world model (its image model frame by frame, and its video model), at each
camera speed; a table of means with standard errors over clips, paired differences of the
video model against the best training-free row, how far each clip moves in latent pixels
(what motion-aware noise can follow), a CSV and a plot with error bars."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from jobs.evaluation.clips import WorldClip, prompt_of, world_clips
from jobs.evaluation.measure import measured, unmap_freed_buffers
from jobs.evaluation.reports import METRICS, clip_record, mean_scores, standard_errors
from jobs.evaluation.scoring import Scorer
from jobs.evaluation.settings import SEED_STRIDE, EvalError, edit_settings
from model.editing.content import text_content
from model.editing.methods.motion_noise import motion_positions
from model.editing.pipeline import edit_video, video_depth
from model.encoders.hints import depth_hint
from model.encoders.prior import load_prior, prior_function
from model.nets.controlnet import ControlNet
from model.sd.control import Control, ControlUnit
from model.sd.controlnet import load_controlnet
from model.sd.loading import load_sd
from model.weights.checkpoint import CheckpointError

COSTS = {"seconds_per_frame": "s / frame", "peak_mib": "peak MiB"}
SD, SD_CONTROL, GEN1 = "tiny SD", "tiny SD + ControlNet", "Gen-1 tiny"
VIDEO_ROW = f"{GEN1} / gen1"


@dataclass
class Arm:
    """One model of the comparison: the methods it runs and (SD only) a depth ControlNet
    whose hint is each clip's MiDaS depth, at ``scale``."""

    model: object
    methods: list[str]
    controlnet: ControlNet | None = None
    scale: float = 1.0

    def control(self, depth: torch.Tensor) -> Control | None:
        """The clip's ``Control`` from its MiDaS depth ``(1, F, 1, H, W)`` (None: no net)."""
        if self.controlnet is None:
            return None
        hint = depth_hint(depth[0].float())[None]  # (1, F, 3, H, W) in [0, 1]
        return Control((ControlUnit(self.controlnet, hint, self.scale, 0.0, 1.0, "depth"),))


def _editor(cfg: DictConfig, arm: Arm, clip: WorldClip, content, depth):
    """``edit(method) -> (frames (F, 3, H, W), cost)``: one clip, one model, one content and
    one seed for every method; the ControlNet (if the arm has one) on every edit."""
    model = arm.model
    seed = cfg.seed + SEED_STRIDE * clip.index
    device = next(model.sampling_unet().parameters()).device
    control = arm.control(depth)

    def edit(method: str):
        settings = edit_settings(
            cfg, cfg.w_t, cfg.t_s, method=method, steps=cfg.methods.steps,
            strength=cfg.methods.strength,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        result, cost = measured(
            lambda: edit_video(model, clip.frames, content, settings,
                               depth=depth if model.uses_depth else None,
                               generator=generator, control=control),
            device,
        )  # fmt: skip
        frames = result.frames[0]
        return frames, {**cost, "seconds_per_frame": cost["seconds"] / frames.shape[0]}

    return edit


def _arms(cfg: DictConfig, gen1) -> dict[str, Arm]:
    """``label -> Arm`` of the comparison: the SD file, the SD file with the ControlNet of
    ``methods.controlnet.file`` (when set) and the Gen-1 model (its methods and ``gen1``)."""
    device = next(gen1.parameters()).device
    sd = load_sd(cfg.methods.sd_checkpoint).to(device)
    arms = {SD: Arm(sd, list(cfg.methods.image))}
    unit = cfg.methods.controlnet
    if unit.file:
        try:
            net = load_controlnet(unit.file, sd.config.unet).to(device)
        except (CheckpointError, FileNotFoundError) as err:
            raise EvalError(f"methods.controlnet.file: {err}") from err
        if net.hint_factor != sd.vae.downsample_factor:
            raise EvalError(
                f"methods.controlnet.file: {unit.file} downsamples its hint by "
                f"{net.hint_factor}, the SD file's VAE by {sd.vae.downsample_factor}"
            )
        arms[SD_CONTROL] = Arm(sd, list(unit.image), net.eval(), float(unit.scale))
    arms[GEN1] = Arm(gen1, [*cfg.methods.image, "gen1"])
    return arms


def clip_motion(frames: torch.Tensor, factor: int) -> float:
    """The largest whole-latent-pixel displacement (either axis) of any frame of ``frames``
    ``(1, F, 3, H, W)`` from the first at the VAE ``factor``, as motion-aware noise rounds it:
    0 means motion_noise starts every frame from the same noise as mov2mov."""
    return float(motion_positions(frames, factor).abs().max())


def run_methods(cfg: DictConfig, gen1, estimator, _clips=None) -> dict:
    """Scores and costs of every (model, method) on every clip at every speed, their means
    and standard errors, the tables and the plot."""
    if cfg.prompt is None:
        raise EvalError("mode=methods edits from prompts: set prompt=TEXT or prompt=caption")
    arms = _arms(cfg, gen1)
    factor = arms[SD].model.vae.downsample_factor
    unmap_freed_buffers()
    warmed: set[str] = set()  # a first edit also faults in code pages: not the model's cost
    to_image = prior_function(load_prior(cfg.prior), seed=cfg.seed,
                              num_candidates=cfg.prior_candidates)  # fmt: skip
    means, errors, per_clip, by_speed = {}, {}, [], {}
    with open_dict(cfg):
        cfg.num_clips = int(cfg.methods.num_clips)
    for speed in cfg.methods.speeds:
        with open_dict(cfg):
            cfg.speed = float(speed)
        records, clips = [], []
        for clip in tqdm(
            list(world_clips(cfg)), desc=f"methods x{speed:g}", disable=not cfg.progress
        ):
            prompt = prompt_of(cfg, clip)
            depth = video_depth(gen1, clip.frames, estimator, cfg.chunk_size)
            score = Scorer(cfg, gen1, estimator, clip, depth)
            scores, same = {}, {}
            for label, arm in arms.items():
                if arm.model is gen1:
                    content = text_content(gen1, prompt, mode="prior", prior=to_image)
                else:
                    content = arm.model.encode_prompt(prompt, "")
                edit = _editor(cfg, arm, clip, content, depth)
                if label not in warmed:
                    edit(arm.methods[0])
                    warmed.add(label)
                outputs = {}
                for method in arm.methods:
                    outputs[method], cost = edit(method)
                    scores[f"{label} / {method}"] = {**score(outputs[method]), **cost}
                if {"mov2mov", "motion_noise"} <= outputs.keys():
                    same[label] = torch.equal(outputs["mov2mov"], outputs["motion_noise"])
            record = {**clip_record(clip), "speed": float(speed), "prompt": prompt,
                      "latent_motion": clip_motion(clip.frames, factor),
                      "motion_noise_equals_mov2mov": same, "scores": scores}  # fmt: skip
            records.append(scores)
            clips.append(record)
            per_clip.append(record)
        key = f"{float(speed):g}"
        means[key], errors[key] = mean_scores(records), standard_errors(records)
        by_speed[key] = clips
    return {
        "table": methods_tables(cfg, means, errors, by_speed),
        "mean": means,
        "standard_error": errors,
        "clips": per_clip,
        "texts": {"methods.csv": methods_csv(means, errors)},
        "figures": {"methods.png": plot_methods(means, errors)},
    }


def _columns(rows: dict) -> list[str]:
    first = next(iter(rows.values()))
    return [m for m in [*METRICS, *COSTS] if m in first and m != "sharpness"]


def _pm(mean: float, error: float) -> str:
    """``mean ± standard error`` to the digits the error supports (n/a for one clip)."""
    if not math.isfinite(error):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {error:.2g}"


def paired_difference(clips: list[dict], a: str, b: str, metric: str) -> tuple[float, float]:
    """Mean and standard error over ``clips`` (per-clip records) of ``a``'s ``metric``
    minus ``b``'s on the same clip, seed and prompt (NaN error for one clip)."""
    d = torch.tensor([c["scores"][a][metric] - c["scores"][b][metric] for c in clips],
                     dtype=torch.float64)  # fmt: skip
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def _best_training_free(rows: dict) -> str:
    return min((n for n in rows if n != VIDEO_ROW), key=lambda n: rows[n]["warp_error"])


def _findings(rows: dict, errors: dict, clips: list[dict]) -> list[str]:
    """The speed's paired comparisons: the video model against the training-free row of the
    lowest warp error, and against the one of the lowest warp error among those whose
    structure error is at most the video model's plus one standard error (the issue's "at
    equal or better structure fidelity"); motion-aware noise against mov2mov on the clips
    whose motion moves the noise."""
    lines = []
    if VIDEO_ROW in rows:
        limit = rows[VIDEO_ROW]["structure_fidelity"] + errors[VIDEO_ROW]["structure_fidelity"]
        faithful = {n: r for n, r in rows.items() if r["structure_fidelity"] <= limit}
        picks = [("Lowest warp error without training", rows)]
        if any(n != VIDEO_ROW for n in faithful):
            title = ("Lowest warp error without training at a structure error within one "
                     f"standard error of the video model's (<= {limit:.3g})")  # fmt: skip
            picks.append((title, faithful))
        for title, candidates in picks:
            best = _best_training_free(candidates)
            warp = paired_difference(clips, VIDEO_ROW, best, "warp_error")
            fidelity = paired_difference(clips, VIDEO_ROW, best, "structure_fidelity")
            lines.append(
                f"- {title}: {best}. Video model minus it, paired over the {len(clips)} clips: "
                f"warp error {_signed(*warp)}, structure fidelity {_signed(*fidelity)}."
            )
    moving = [c for c in clips if c["latent_motion"] >= 1]
    motions = ", ".join(f"{c['latent_motion']:g}" for c in clips)
    lines.append(
        f"- Motion-aware noise: {len(moving)} of {len(clips)} clips move the noise by at least "
        f"one latent pixel (largest displacement per clip: {motions})."
    )
    for label in clips[0]["motion_noise_equals_mov2mov"]:
        moved = [c for c in clips if not c["motion_noise_equals_mov2mov"][label]]
        if not moved:
            lines.append(f"  {label}: motion_noise equals mov2mov on every clip.")
            continue
        a, b = f"{label} / motion_noise", f"{label} / mov2mov"
        warp = paired_difference(moved, a, b, "warp_error")
        fidelity = paired_difference(moved, a, b, "structure_fidelity")
        lines.append(
            f"  {label}: motion_noise differs from mov2mov on {len(moved)} clips; there, "
            f"motion_noise minus mov2mov: warp error {_signed(*warp)}, structure fidelity "
            f"{_signed(*fidelity)}."
        )
    return lines


def _signed(mean: float, error: float) -> str:
    return f"{mean:+.3g}" if not math.isfinite(error) else f"{mean:+.3g} ± {error:.2g}"


def methods_tables(cfg: DictConfig, means: dict, errors: dict, by_speed: dict) -> str:
    """One markdown table per speed (mean ± standard error over clips; costs as means) with
    its paired findings; the settings and the strongest training-free row at the end."""
    out = []
    titles = {**{k: v[0] for k, v in METRICS.items()}, **COSTS}
    for speed, rows in means.items():
        columns = _columns(rows)
        out.append(f"### Camera speed x{speed}\n")
        out.append("| model / method | " + " | ".join(titles[c] for c in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for name, scores in rows.items():
            cells = [
                f"{scores[c]:.3g}" if c in COSTS else _pm(scores[c], errors[speed][name][c])
                for c in columns
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        out.extend(_findings(rows, errors[speed], by_speed[speed]))
        out.append("")
    settings = (
        f"{len(next(iter(means.values())))} settings; {cfg.num_clips} clips x {cfg.num_frames} "
        f"frames at {cfg.size} px per speed; {cfg.methods.steps} {cfg.sampler} steps at "
        f"strength {cfg.methods.strength:g}, w {cfg.w:g}, t_s {cfg.t_s}; ± one standard error "
        "over clips; seconds are process CPU time."
    )
    if cfg.methods.controlnet.file:
        settings += (
            f" {SD_CONTROL}: {cfg.methods.controlnet.file} at scale "
            f"{cfg.methods.controlnet.scale:g}, hint the clip's MiDaS depth."
        )
    best = strongest_training_free(means)
    return "\n".join(out) + (
        f"\n{settings} Higher is better: frame consistency, prompt consistency. Lower is "
        f"better: warp error, structure fidelity. Lowest mean warp error without training "
        f"over the speeds: {best}.\n"
    )


def methods_csv(means: dict, errors: dict) -> str:
    """Every (speed, model, method) row with every metric and its standard error, as CSV."""
    rows = next(iter(means.values()))
    columns = _columns(rows)
    buffer = io.StringIO()
    head = [x for c in columns for x in (c, f"{c}_se")]
    buffer.write("speed,model,method," + ",".join(head) + "\n")
    for speed, rows in means.items():
        for name, scores in rows.items():
            model, method = name.split(" / ")
            values = ",".join(f"{v:.6g}" for c in columns
                              for v in (scores[c], errors[speed][name][c]))  # fmt: skip
            buffer.write(f"{speed},{model},{method},{values}\n")
    return buffer.getvalue()


def plot_methods(means: dict, errors: dict) -> Figure:
    """Per speed, warp error against structure fidelity of every (model, method), with
    one-standard-error bars on both: the lower left corner is consistent and faithful."""
    figure = Figure(figsize=(5.6 * len(means), 4.8), layout="constrained")
    panels = figure.subplots(1, len(means), squeeze=False)[0]
    colours = {SD: "tab:blue", SD_CONTROL: "tab:green", GEN1: "tab:red"}
    for panel, (speed, rows) in zip(panels, means.items(), strict=True):
        points: dict[tuple, list[str]] = {}  # identical results share one point and label
        bars: dict[tuple, tuple[float, float]] = {}
        for name, scores in rows.items():
            model, method = name.split(" / ")
            key = (model, scores["structure_fidelity"], scores["warp_error"])
            points.setdefault(key, []).append(method)
            se = errors[speed][name]
            bars[key] = (se["structure_fidelity"], se["warp_error"])
        for (model, x, y), methods in points.items():
            dx, dy = bars[(model, x, y)]
            marker = "*" if "gen1" in methods else "o"
            colour = colours.get(model, "k")
            err = {"xerr": dx, "yerr": dy} if math.isfinite(dx) and math.isfinite(dy) else {}
            panel.errorbar([x], [y], fmt=marker, color=colour, ms=11 if marker == "*" else 5,
                           elinewidth=0.8, capsize=2, alpha=0.85, **err)  # fmt: skip
            text = panel.annotate(" =\n".join(methods), (x, y), fontsize=6, xytext=(4, -2),
                                  textcoords="offset points", va="top")  # fmt: skip
            text.set_in_layout(False)  # labels never squeeze the panels
        panel.margins(x=0.3, y=0.2)
        panel.set_xscale("log")
        panel.set_yscale("log")
        panel.set_xlabel("structure fidelity error (lower is better)")
        panel.set_ylabel("warp error (lower is better)")
        panel.set_title(f"camera speed x{speed}")
        panel.grid(alpha=0.3, which="both")
    for model, colour in colours.items():
        if any(n.startswith(f"{model} / ") for n in next(iter(means.values()))):
            panels[0].scatter([], [], color=colour, label=model)
    panels[0].legend(fontsize=8, loc="best")
    figure.suptitle("Editing methods on held-out world clips: mean ± one standard error "
                    "(star: the video model)", fontsize=10)  # fmt: skip
    return figure


def strongest_training_free(means: dict) -> str:
    """The training-free (model, method) of the lowest mean warp error over speeds."""
    names = [n for n in next(iter(means.values())) if n != VIDEO_ROW]
    return min(names, key=lambda n: sum(r[n]["warp_error"] for r in means.values()))
