"""eval.py's modes: ``compare`` (the video model against frame-by-frame editing, each from
independent or shared noise), ``sweep`` (``w_t`` and ``t_s``), ``prompts`` (text through the
prior against the raw CLIP text embedding) and ``methods`` (every editing method,
``jobs.evaluation.methods``); ``run`` does one and writes its files."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from data.captions import world_pairs
from jobs.evaluation.clips import WorldClip, prompt_of, world_clips
from jobs.evaluation.long import run_long
from jobs.evaluation.methods import run_methods
from jobs.evaluation.reports import (
    INPUT_ROW,
    clip_record,
    describe,
    markdown_table,
    mean_scores,
    plot_sweep,
    write_atomic,
    write_text,
)
from jobs.evaluation.scoring import Editor, Scorer
from jobs.evaluation.settings import EvalError, check_config, device_of, load_model
from model.editing.content import text_content
from model.encoders.prior import load_prior, prior_function
from model.training.prior_training import evaluate_prior
from model.weights.release import default_noise_correlation

SETTINGS = {
    "video": "video model (w_t={w_t}, noise per frame)",
    "video_shared": "video model (w_t={w_t}, one shared noise)",
    "frames_independent": "frame by frame, image model, independent noise",
    "frames_shared": "frame by frame, image model, one shared noise",
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


def run(cfg: DictConfig) -> dict:
    """Evaluate per ``cfg.mode``; write the table, the JSON and (sweep) the plots; returns
    the result (``table``, ``mean``, ``clips``, ``files``)."""
    started = time.perf_counter()
    check_config(cfg)
    if cfg.noise_correlation is None and Path(cfg.checkpoint).is_file():
        cfg.noise_correlation = default_noise_correlation(cfg.checkpoint)
    gen1, estimator = load_model(cfg, device_of(cfg))
    clips = [] if cfg.mode == "long" else list(world_clips(cfg))  # long renders its own
    try:
        modes = {"compare": run_compare, "sweep": run_sweep, "prompts": run_prompts}
        modes["methods"] = run_methods
        modes["long"] = run_long
        result = modes[cfg.mode](cfg, gen1, estimator, clips)
    except ValueError as err:  # settings the model cannot take (e.g. a size the VAE cannot)
        raise EvalError(str(err)) from err
    figures = result.pop("figures", {})
    texts = result.pop("texts", {})
    out = Path(cfg.output_dir)
    report = {**describe(cfg, time.perf_counter() - started), **result}
    files = {out / f"{cfg.mode}.json": json.dumps(report, indent=2) + "\n"}
    files[out / f"{cfg.mode}.md"] = f"# eval.py mode={cfg.mode}\n\n{result['table']}"
    files.update({out / name: text for name, text in texts.items()})
    for path, text in files.items():
        write_text(path, text)
    for name, figure in figures.items():
        write_atomic(out / name, lambda tmp, f=figure: f.savefig(tmp, format="png", dpi=110))
    return {**report, "files": [str(p) for p in [*files, *(out / n for n in figures)]]}
