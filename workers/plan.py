"""A spec's dry run: what queueing it would mean, without queueing anything.

``POST /runs?dry_run=1`` and ``bitbench submit --dry-run`` return :func:`dry_run`'s dict: the grid's
trial count (by label), the data files the data set reads, and the estimated single-GPU time
from the GPU figures that ``bench/gpu.py`` records (:data:`GPU_FIGURES`), or null with the reason.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .data.registry import required_files, train_images
from .spec import ExperimentSpec

#: where ``bench/gpu.py`` records its figures (``$BITBENCH_GPU_FIGURES`` overrides): JSON
#: ``{"card": str, "command": str, "images_per_s": {model: training images/s of one W1A1 aqe trial alone on the GPU}}``
GPU_FIGURES = Path(__file__).resolve().parents[1] / "bench" / "gpu_figures.json"


def gpu_figures_path() -> Path:
    return Path(os.environ.get("BITBENCH_GPU_FIGURES") or GPU_FIGURES)


def read_gpu_figures(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded GPU figures, or None when none are recorded (no file, or not the format above)."""
    try:
        figures = json.loads((path or gpu_figures_path()).read_text())
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) and isinstance(figures.get("images_per_s"), dict) else None


def estimate_gpu_s(spec: ExperimentSpec, figures: dict[str, Any] | None) -> tuple[float | None, str]:
    """(seconds, how): trials × epochs × training images per epoch ÷ the model's recorded images/s on
    one GPU, one trial at a time (training only: evaluation and start-up come on top); (None, why not)."""
    if figures is None:
        return None, f"no GPU figures recorded ({gpu_figures_path().name}: run bench/gpu.py on a GPU)"
    rate = figures["images_per_s"].get(spec.model)
    if not isinstance(rate, (int, float)) or rate <= 0:
        return None, f"no GPU figure recorded for model {spec.model!r} (bench/gpu.py --models {spec.model})"
    images = train_images(spec.dataset, spec.dataset_options)
    if images is None:
        return None, f"the training-set size of {spec.dataset!r} is not known without reading it"
    seconds = spec.trial_count() * spec.epochs * images / rate
    return seconds, (f"{spec.trial_count()} trials × {spec.epochs} epochs × {images:,} images ÷ {rate:,.0f} images/s "
                     f"({spec.model} on {figures.get('card', 'the recorded GPU')}, one trial at a time; training only)")


def dry_run(spec: ExperimentSpec, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """What queueing ``spec`` would do: ``{name, dataset, model, spec_hash, trials, trials_by_label, epochs,
    train_images_per_epoch, estimated_gpu_s, estimate, data_files}``; ``figures`` default to the recorded ones."""
    seconds, how = estimate_gpu_s(spec, figures if figures is not None else read_gpu_figures())
    return {
        "name": spec.name, "dataset": spec.dataset, "model": spec.model, "spec_hash": spec.spec_hash(),
        "trials": spec.trial_count(), "trials_by_label": dict(Counter(t.label for t in spec.trials())),
        "epochs": spec.epochs, "train_images_per_epoch": train_images(spec.dataset, spec.dataset_options),
        "estimated_gpu_s": seconds, "estimate": how,
        "data_files": required_files(spec.dataset, spec.dataset_options),
    }
