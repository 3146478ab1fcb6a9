"""Experiment trackers through accelerate: training metrics, the hparams, the resolved config, eval accuracies.

`train.trackers` names accelerate trackers (`tensorboard` by default; `wandb`, `mlflow`, ... where the
user has them installed; `[]`: metrics.jsonl only). Training logs every log window's means to each;
the run's config goes in once as hparams (flat `section.key` values) and as text (the resolved TOML).
TensorBoard writes to run_dir/tensorboard, the directory the trainer always used.

Eval accuracies arrive after training (`comad-distill eval --checkpoint`, each sweep variant's eval):
they are added to the run's TensorBoard at the checkpoint's step, as `eval/<model>/<feature>/<metric>`,
through accelerate's TensorBoardTracker. Other trackers would need their finished run resumed (W&B,
MLflow each have their own way), so they get the training metrics, hparams and config only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from store_schema.choices import FEATURES
from store_schema.config import PipelineConfig, config_to_dict, dumps_toml

PROJECT = "tensorboard"  # accelerate's project name = the TensorBoard directory under run_dir


def hparams(cfg: PipelineConfig) -> dict[str, bool | int | float | str]:
    """The config as flat `section.key` scalars (lists and tables as JSON text), as trackers take hparams."""
    flat: dict[str, Any] = {}
    for section, table in config_to_dict(cfg).items():
        if not isinstance(table, dict):  # seed
            flat[section] = table
            continue
        if section == "teachers":
            table = {f"{name}.{k}": v for name, t in table.items() for k, v in t.items()}
        flat.update({f"{section}.{k}": v for k, v in table.items()})
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}


def start_trackers(accelerator, cfg: PipelineConfig, start_step: int) -> None:
    """Start the accelerator's trackers with the hparams and the resolved config (main process only)."""
    if not accelerator.log_with:
        return
    # purge_step: a resumed run's TensorBoard drops the events of the interrupted attempt after the checkpoint
    accelerator.init_trackers(PROJECT, config=hparams(cfg), init_kwargs={"tensorboard": {"purge_step": start_step + 1}})
    # four-space indent: TensorBoard's text plugin renders Markdown, where that keeps the TOML a code block
    accelerator.log({"config": "    " + dumps_toml(cfg).replace("\n", "\n    ")}, step=start_step)


def finish_trackers(accelerator) -> None:
    """Close the trackers, not the process group (accelerator.end_training would destroy it: a sweep goes on)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def log_eval(cfg: PipelineConfig, run_dir: str | Path, step: int, model: str, result: dict[str, Any]) -> None:
    """Add an evaluation's accuracies to the run's TensorBoard at `step` (when the run logs to TensorBoard)."""
    if "tensorboard" not in cfg.train.trackers:
        return
    try:
        from accelerate.tracking import TensorBoardTracker
        from torch.utils import tensorboard  # noqa: F401 -- the tracker needs it; absent: nothing to log to
    except ImportError:
        return
    values = {f"eval/{model}/{f}/{m}": float(v) for f in FEATURES if isinstance(result.get(f), dict)
              for m, v in result[f].items()}
    tracker = TensorBoardTracker(PROJECT, str(run_dir))
    tracker.start()
    tracker.log(values, step=step)
    tracker.finish()
