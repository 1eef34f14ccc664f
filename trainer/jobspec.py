"""The Job: what one training run works from (checked by trainer.job.prepare) and what its
stages hand on to each other. A module of its own so that the stage modules (trainer.sft,
trainer.rloo, trainer.run_folder) can name the type without importing the job script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config import TrainConfig
from trainer.reference import ReferenceRow
from vbon.sampling import Sampling


@dataclass
class Job:
    cfg: TrainConfig
    model_path: str
    sampling: Sampling
    openings: list[str]
    reward: Any
    engine_settings: Any
    eval_openings: list[str] = field(default_factory=list)
    reference_rows: list[ReferenceRow] | None = None
    resume_from: str | None = None
    reference_source: str = ""
    rl_prompts: int = 0  # the last ones: vbon's RL stage trains on them, its warm start not
    argv: list[str] = field(default_factory=list)  # the command line, recorded in vbon.json
    # time.monotonic() when --max-train-minutes runs out, for all training stages together.
    train_deadline: float | None = None


def engine_settings_for(model_path: str) -> Any:
    """The vLLM engine settings for the base model (reference samples, rollouts, evaluation)."""
    from vbon.settings import CoreSettings, load_settings

    return load_settings(CoreSettings, model=model_path)
