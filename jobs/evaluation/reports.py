"""What an evaluation writes: per-metric means, markdown tables, sweep plots, the run's record;
every file written atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from jobs.evaluation.clips import WorldClip
from model.weights.atomic import atomic_output, file_sha256

INPUT_ROW = "input (unedited)"


METRICS = {  # key: (column title, higher is better; None: neither)
    "frame_consistency": ("frame consistency", True),
    "warp_error": ("warp error", False),
    "structure_fidelity": ("structure fidelity", False),
    "prompt_consistency": ("prompt consistency", True),
    "sharpness": ("sharpness", None),  # detail: falls as edits blur
}


def mean_scores(records: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per row, each metric's mean over clips."""
    rows = records[0].keys()
    return {
        row: {m: sum(r[row][m] for r in records) / len(records) for m in records[0][row]}
        for row in rows
    }


def standard_errors(records: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per row, each metric's standard error of the mean over clips: the sample standard
    deviation (n - 1) over sqrt(n); NaN for a single clip."""
    n = len(records)
    out = {}
    for row, first in records[0].items():
        out[row] = {}
        for metric in first:
            values = torch.tensor([r[row][metric] for r in records], dtype=torch.float64)
            out[row][metric] = float(values.std() / n**0.5) if n > 1 else float("nan")
    return out


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
