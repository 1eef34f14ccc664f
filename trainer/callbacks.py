"""The job's one training callback: progress bar (step, reward, KL, time left), per-step
sequence KL and wall-clock time in the log history (for the curves), early stop on KL and on a
time limit."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = ".vbon-complete"


def sequence_kl(entry: dict) -> float | None:
    """TRL logs KL per token (sum of log-ratios / completion tokens); per sequence it is that
    times the mean completion length (the same token count, as truncated completions are kept)."""
    if "kl" not in entry or "completions/mean_length" not in entry:
        return None
    return float(entry["kl"]) * float(entry["completions/mean_length"])


class JobCallback(TrainerCallback):
    def __init__(
        self,
        *,
        kl_stop: float | None,
        kl_window: int,
        max_minutes: float = 0.0,
        deadline: float | None = None,
        progress: bool = True,
    ) -> None:
        self.kl_stop = kl_stop
        self.kl_window = kl_window
        self.max_seconds = max_minutes * 60.0
        # time.monotonic() at which --max-train-minutes runs out: set once per job, so that a
        # warm start and the RL stage after it share one budget (None: from this stage's start).
        self.deadline = deadline
        self.progress = progress
        self.bar: tqdm | None = None
        self.t0 = time.monotonic()
        self.offset = 0.0
        self.stop_reason: str | None = None
        self.cpu0 = time.process_time()
        self.cpu_offset = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.monotonic()
        if self.deadline is None and self.max_seconds:
            self.deadline = self.t0 + self.max_seconds
        # A resumed run continues the clock of the run it resumes.
        past = [e["elapsed_s"] for e in state.log_history if "elapsed_s" in e]
        self.offset = float(past[-1]) if past else 0.0
        # CPU seconds of this process (all its threads): comparable across runs on a shared
        # machine, where wall-clock time depends on what else runs.
        self.cpu0 = time.process_time()
        past_cpu = [e["cpu_s"] for e in state.log_history if "cpu_s" in e]
        self.cpu_offset = float(past_cpu[-1]) if past_cpu else 0.0
        if self.progress:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        if self.max_seconds and self.deadline is not None and time.monotonic() >= self.deadline:
            minutes = self.max_seconds / 60
            self.stop_reason = f"time limit ({minutes:g} min) at step {state.global_step}"
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.log_history:
            return
        entry = state.log_history[-1]
        if "loss" not in entry and "reward" not in entry:
            return
        entry["elapsed_s"] = round(self.offset + time.monotonic() - self.t0, 2)
        entry["cpu_s"] = round(self.cpu_offset + time.process_time() - self.cpu0, 2)
        kl = sequence_kl(entry)
        if kl is not None:
            entry["kl_seq"] = kl
        if self.bar is not None:
            post = {}
            if "raw_reward" in entry:
                post["reward"] = f"{entry['raw_reward']:.3f}"
            if "log_fhat" in entry:
                post["logF"] = f"{entry['log_fhat']:.2f}"
            if kl is not None:
                post["KL"] = f"{kl:.2f}"
            if "loss" in entry and not post:
                post["loss"] = f"{entry['loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)
        if self.kl_stop:
            kls = [e["kl_seq"] for e in state.log_history if "kl_seq" in e][-self.kl_window :]
            if len(kls) == self.kl_window and sum(kls) / len(kls) > self.kl_stop:
                self.stop_reason = (
                    f"KL to the base over the last {self.kl_window} steps "
                    f"({sum(kls) / len(kls):.2f} nats) passed --max-kl {self.kl_stop:.2f} at "
                    f"step {state.global_step}"
                )
                control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        # Called after the Trainer has written every file of the checkpoint.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / CHECKPOINT_COMPLETE).write_text(str(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.stop_reason:
            logger.info("stopped early: %s", self.stop_reason)
