"""The trainer's configuration: one dataclass, every field a flag (`--learning-rate 1e-4`) and a
key of an optional YAML/JSON config file (`--config recipe.yaml`). Precedence: defaults < file <
flags. `__post_init__` rejects settings that cannot work, saying how to fix them, before any
long work starts (the style of TRL's RLOOConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from vbon.bon import beta_for_n, kl_bound
from vbon.errors import ConfigError
from vbon.sampling import DEFAULT_MAX_TOKENS

METHODS = ("vbon", "kl-rl", "bon-sft")
OBJECTIVES = ("bound", "exact")
DTYPES = ("auto", "float32", "bfloat16")
ROLLOUTS = ("vllm", "transformers")
KL_PENALTIES = ("sequence", "token")
CREDITS = ("sequence", "critic")
WARM_START_LOSSES = ("bon-sft", "advantage", "bon-weighted")
SFT_BATCHES = ("prompt-chunks", "shuffled", "by-prompt")
# Per --warm-start-loss, as calibrated on held-out prompts (docs/trainer.md): the epochs of
# the warm start, and the RL steps after it.
VBON_WARM_START_EPOCHS = {"bon-weighted": 1.0, "bon-sft": 3.0, "advantage": 1.0}
VBON_RL_PROMPTS = 96  # 24 RL steps of 4 prompts before one repeats
DEFAULT_STEPS = 128
# bon-weighted: held-out KL 0.63 at step 6, 0.96 at 18, 1.15 at 24 (bound 1.20);
# bon-sft: 0.96 at step 6, 1.26-1.29 at 8-9.
VBON_WARM_RL_STEPS = {"bon-weighted": 24, "bon-sft": 6, "advantage": 6}
VBON_KL_STOP_FRACTION = 0.9  # of BoN-N's bound: the 5-step window lags a KL rising ~0.05/step


@dataclass
class TrainConfig:
    """vBoN distillation (and the paper's baselines) into a LoRA adapter."""

    # --- what to train -------------------------------------------------------------------
    method: str = field(
        default="vbon",
        metadata={
            "help": "vbon: RL on log F-hat(r(y)) with KL weight 1/(N-1) (the paper); kl-rl: "
            "KL-regularised RL on the raw reward with KL weight --beta; bon-sft: supervised "
            "fine-tuning on the best of N base-model samples per prompt.",
            "choices": METHODS,
        },
    )
    n: int = field(
        default=8,
        metadata={"help": "N of the Best-of-N distribution to imitate (vbon, bon-sft); >= 2."},
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "KL weight against the base model. vbon: 1/(N-1), leave unset; kl-rl: "
            "required (> 0)."
        },
    )
    objective: str = field(
        default="bound",
        metadata={
            "help": "vbon only. bound: the paper's lower bound, reward log F-hat; exact: the "
            "exact BoN log-probability log sum_i C(N,i) F^(N-i) p^i (one more forward pass "
            "per step for the reference log-probability p).",
            "choices": OBJECTIVES,
        },
    )
    m: int = field(
        default=16,
        metadata={
            "help": "Reference samples per training prompt for F-hat (and the BoN-SFT pool); "
            ">= N. The paper used ~300; F-hat's resolution is 1/(M+1)."
        },
    )
    # --- inputs ------------------------------------------------------------------------------
    model: str = field(
        default="embedded",
        metadata={
            "help": "Base model: 'embedded' (SmolLM2-135M-Instruct) or a Hugging Face folder."
        },
    )
    reward: str = field(
        default="vader",
        metadata={
            "help": "Reward: 'vader', a Hugging Face sequence-classification folder "
            "('hf:<folder>') or the http(s)://host:port of a vLLM pooling server (its model "
            "name, key and timeouts: VBON_REWARD_MODEL, _API_KEY, _TIMEOUT_S, _RETRIES)."
        },
    )
    prompts: str = field(
        default="",
        metadata={
            "help": 'Training prompt file (JSONL, {"prompt": "..."} per line); default: the '
            "packaged training openings."
        },
    )
    num_prompts: int = field(
        default=0,
        metadata={
            "help": "Use the first K training prompts (0: all; the packaged set has 600, and "
            "BoN-SFT gains from every one of them, docs/trainer.md)."
        },
    )
    reference_from: str = field(
        default="",
        metadata={
            "help": 'Take reference samples from this JSONL ({"prompt", "responses", '
            '"rewards"} per line, as the gateway\'s BoN log writes) instead of sampling them '
            "with vLLM; its prompts become the training prompts."
        },
    )
    # --- optimisation ------------------------------------------------------------------------
    steps: int | None = field(
        default=None,
        metadata={
            "help": "RL optimizer steps (bon-sft: see --sft-epochs). Default after vbon's warm "
            f"start: {VBON_WARM_RL_STEPS['bon-weighted']} for --warm-start-loss bon-weighted "
            "(the CPU recipe's held-out KL is ~1.15 nats there, under BoN-8's bound of 1.20), "
            f"{VBON_WARM_RL_STEPS['bon-sft']} for the others (from BoN-SFT's ~0.9 nats the "
            "held-out KL passes the bound by step 8, and the training batches' KL that "
            f"--max-kl reads lags it); else {DEFAULT_STEPS} (the early stops below usually end "
            "a CPU run first)."
        },
    )
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per optimizer step."})
    completions_per_prompt: int = field(
        default=8,
        metadata={"help": "Rollouts per prompt (RLOO's leave-one-out group size); >= 2."},
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    lr_schedule: str = field(
        default="constant", metadata={"help": "transformers lr scheduler type (constant, linear, "
                                               "cosine)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    adam_beta1: float = field(
        default=0.98,
        metadata={
            "help": "AdamW's first-moment decay, both stages. Adam moves every weight by about "
            "the learning rate, whatever the signal-to-noise ratio of its gradient; averaging "
            "the noisy per-step gradients over ~50 steps (0.98) instead of ~10 (0.9, "
            "transformers' default) gave the CPU recipe's adapters about as much or a little "
            "more reward per nat of KL (c 0.53-0.57 against 0.51-0.56; docs/trainer.md)."
        },
    )
    kl_penalty: str = field(
        default="sequence",
        metadata={
            "help": "How the KL to the base enters RL (vbon, kl-rl). sequence: TRL's RLOO, "
            "beta * sum_t log(pi(y_t)/pi_base(y_t)) subtracted from each rollout's reward; "
            "token: beta * the exact per-position KL over the vocabulary, summed over the "
            "completion, added to the loss (the same expected penalty with a gradient that "
            "does not depend on the sampled token; skips one forward pass per step; "
            "experimental, see docs/trainer.md).",
            "choices": KL_PENALTIES,
        },
    )
    credit: str = field(
        default="sequence",
        metadata={
            "help": "How RL credits a rollout's advantage to its tokens (vbon). sequence: "
            "TRL's RLOO, every token the same; critic: per token, minus the change in a "
            "critic's value over the prefix (a ridge fit of the base model's hidden states onto "
            "the reference samples' log F-hat, made before RL; unbiased, less variance; "
            "trainer/critic.py).",
            "choices": CREDITS,
        },
    )
    critic_prompts: int = field(
        default=192,
        metadata={
            "help": "--credit critic: fit the critic on the reference samples of this many "
            "warm-start prompts (the last ones; 15 %% of them held out to check the fit)."
        },
    )
    normalize_advantages: bool = field(
        default=False,
        metadata={"help": "Divide RLOO advantages by their batch standard deviation."},
    )
    max_kl: float | None = field(
        default=None,
        metadata={
            "help": "Stop early when the running mean of the sequence KL to the base (nats, "
            "over the last --kl-window steps, estimated on the training rollouts) exceeds this. "
            "Default for vbon: 0.9 x BoN-N's bound log N - (N-1)/N (the window lags a rising "
            "KL by a few steps); none for the baselines. 0 disables."
        },
    )
    kl_window: int = field(
        default=5, metadata={"help": "Steps averaged for the --max-kl early stop."}
    )
    max_train_minutes: float = field(
        default=30.0,
        metadata={
            "help": "Stop training (and publish) after this many minutes of training, "
            "all stages together (vbon's warm start and its RL stage share it); 0: no limit."
        },
    )
    sft_epochs: float = field(default=2.0, metadata={"help": "bon-sft only: epochs."})
    sft_learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "AdamW learning rate of BoN-SFT (the bon-sft method and vbon's warm start; "
            "RL uses --learning-rate). At 1e-4 three epochs reach ~0.9 nats instead of ~0.6 "
            "at 5e-5, for about the same share of BoN-N's gain per nat (docs/trainer.md)."
        },
    )
    sft_kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "BoN-SFT (bon-sft and vbon's warm start): weight of the exact per-token "
            "KL(pi || pi_base) over the vocabulary at the completion positions, added to the "
            "per-token NLL of the BoN samples. It pulls back the drift that fitting a few "
            "samples per prompt adds beyond the tilt toward higher reward. 0: plain SFT."
        },
    )
    sft_batches: str = field(
        default="prompt-chunks",
        metadata={
            "help": "bon-sft and vbon's warm start: 'prompt-chunks' (default) keeps runs of 4 "
            "examples of one prompt together and orders the runs at random (~8 prompts per "
            "batch, each forwarded once for its run: steps ~1.4x shorter than shuffled, the "
            "same share per root nat); 'shuffled' fills "
            "each batch with examples drawn at random from all prompts; 'by-prompt' keeps a "
            "prompt's examples in one batch (the prompts in a seeded order, anew each epoch): "
            "steps ~1.6x shorter than shuffled, but less of BoN-N's gain per root nat "
            "(0.50-0.51 against 0.55 on the CPU recipe).",
            "choices": SFT_BATCHES,
        },
    )
    warm_start_epochs: float | None = field(
        default=None,
        metadata={
            "help": "vbon only: epochs of supervised training on the reference samples (see "
            "--warm-start-loss; at --sft-learning-rate) before the RL stage, which then "
            "starts from that adapter; the KL is still to the base model. Default for vbon: "
            f"{VBON_WARM_START_EPOCHS['bon-weighted']:g} for bon-weighted (~7 samples per "
            f"prompt), {VBON_WARM_START_EPOCHS['bon-sft']:g} for bon-sft (2 winners per prompt), "
            f"{VBON_WARM_START_EPOCHS['advantage']:g} for advantage (on the CPU recipe a warm "
            "start buys ~2.5x more reward per nat than RL; docs/trainer.md); 0: RL from the "
            "base."
        },
    )
    warm_start_loss: str = field(
        default="bon-weighted",
        metadata={
            "help": "vbon's warm start (default bon-weighted): "
            "'bon-sft' fits the best of each group of N reference samples (BoN-N's samples); "
            "'advantage' fits every reference sample whose log "
            "F-hat(r) is above its prompt's mean, weighted by how far above (about linear in "
            "the reward's rank, where BoN-SFT's weight sits on the winners); 'bon-weighted' "
            "fits every reference sample weighted by its probability of being BoN-N's choice "
            "among the M (BoN-SFT's target without drawing the winners).",
            "choices": WARM_START_LOSSES,
        },
    )
    warm_start_from: str = field(
        default="",
        metadata={
            "help": "vbon with a warm start: take this finished warm-start adapter (an earlier "
            "run's runs/<name>/warm-start, or a bon-sft adapter) instead of training one, so "
            "several RL recipes can start from one warm start. Its LoRA rank, alpha and target "
            "modules must match this run's; the RL stage still trains on the last "
            "--rl-prompts prompts, which should be those the warm start left out."
        },
    )
    rl_prompts: int | None = field(
        default=None,
        metadata={
            "help": "vbon with a warm start: the last K training prompts are left out of the "
            "warm start and are the RL stage's prompts. On prompts the SFT trained on, the "
            "policy repeats its SFT targets, so RL's reward and KL (and the KL early stop) "
            f"say little about new prompts. Default: {VBON_RL_PROMPTS} (at most a quarter of "
            "the prompts; 0 when that is fewer than --prompts-per-step); 0: both stages train "
            "on every prompt."
        },
    )
    # --- model / adapter -----------------------------------------------------------------
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (the gateway's max 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names that get LoRA weights."},
    )
    max_tokens: int = field(
        default=DEFAULT_MAX_TOKENS,
        metadata={
            "help": "Max new tokens per completion (reference samples, rollouts and "
            "evaluation; temperature/top-p/top-k come from vbon.sampling)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Training dtype: auto (bfloat16 autocast on a GPU or a CPU with native "
            "bf16 (AVX512-BF16/AMX), float32 elsewhere), float32, bfloat16 (autocast; LoRA "
            "weights stay fp32).",
            "choices": DTYPES,
        },
    )
    torch_threads: int = field(
        default=0, metadata={"help": "torch CPU threads for training; 0: all cores."}
    )
    rollouts: str = field(
        default="vllm",
        metadata={
            "help": "What samples the RL rollouts: vllm (an offline vLLM engine fed the "
            "current LoRA weights after every step: the gateway's sampler, and on a CPU "
            "rollouts ~1.8x faster than TRL's generate) or transformers (TRL's own generate).",
            "choices": ROLLOUTS,
        },
    )
    # --- output, checkpoints, evaluation -------------------------------------------------
    output: str = field(
        default="",
        metadata={
            "help": "Adapter folder (its name is the adapter's name at the gateway); default "
            "adapters/vbon-n{N}, adapters/kl-rl-b{beta}, adapters/bon-sft-n{N}."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing output folder when done."}
    )
    work_dir: str = field(
        default="runs",
        metadata={"help": "Checkpoints, logs and the reference cache go under this folder."},
    )
    checkpoint_every: int = field(
        default=10, metadata={"help": "Save a checkpoint every K steps (for --resume)."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last checkpoint of the same run (same settings)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for sampling, data order and init."})
    evaluate: bool = field(
        default=True,
        metadata={
            "help": "After training, evaluate base / trained / BoN-N on held-out prompts with "
            "vLLM and store the metrics in vbon.json."
        },
    )
    eval_prompts: str = field(
        default="",
        metadata={"help": "Held-out prompt file; default: the packaged eval openings."},
    )
    eval_num_prompts: int = field(
        default=0,
        metadata={
            "help": "Held-out prompts used by the evaluation: the first K (0: all 200 packaged "
            "ones; the first 64 alone put the share of BoN's gain 10-20 points above all 200)."
        },
    )
    eval_samples: int = field(
        default=2,
        metadata={
            "help": "Evaluation samples per prompt: the trained policy draws this many, the "
            "base model this many groups of N (BoN-N = best of each group)."
        },
    )
    config: str = field(
        default="",
        metadata={
            "help": "YAML or JSON file with any of these settings (flags override it); also "
            "--recipe, which takes a recipe's name too: --recipe vbon-n8 reads "
            "trainer/recipes/vbon-n8.yaml, the recipe of the shipped vBoN-8 adapter."
        },
    )

    def __post_init__(self) -> None:
        errors: list[str] = []
        loss = self.warm_start_loss
        if self.warm_start_epochs is None:
            vbon = self.method == "vbon"
            self.warm_start_epochs = VBON_WARM_START_EPOCHS.get(loss, 0.0) if vbon else 0.0
        if self.steps is None:
            warm = self.method == "vbon" and self.warm_start_epochs > 0
            self.steps = VBON_WARM_RL_STEPS.get(loss, DEFAULT_STEPS) if warm else DEFAULT_STEPS
        if self.method not in METHODS:
            errors.append(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            errors.append(f"--objective must be 'bound' or 'exact', got {self.objective!r}")
        if self.dtype not in DTYPES:
            errors.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kl_penalty not in KL_PENALTIES:
            errors.append(
                f"--kl-penalty must be one of {', '.join(KL_PENALTIES)}, got {self.kl_penalty!r}"
            )
        if self.credit not in CREDITS:
            errors.append(f"--credit must be one of {', '.join(CREDITS)}, got {self.credit!r}")
        if self.credit == "critic" and self.method != "vbon":
            errors.append(
                "--credit critic fits its critic on the reference samples of --method vbon; "
                "use --credit sequence for kl-rl and bon-sft"
            )
        if self.credit == "critic" and self.critic_prompts < 2:
            errors.append(
                f"--critic-prompts must be >= 2 (one to fit, one to check), got "
                f"{self.critic_prompts}"
            )
        if self.rollouts not in ROLLOUTS:
            errors.append(
                f"--rollouts must be one of {', '.join(ROLLOUTS)}, got {self.rollouts!r}"
            )
        if self.method in ("vbon", "bon-sft"):
            if self.n < 2:
                errors.append(
                    f"--n must be >= 2 (vBoN's KL weight is 1/(N-1); BoN-1 is the base model), "
                    f"got {self.n}"
                )
            elif self.m < self.n:
                errors.append(
                    f"--m ({self.m}) must be >= --n ({self.n}): F-hat for BoN-N needs at least "
                    "N reference samples per prompt (the paper used ~300); raise --m"
                )
        if self.method == "vbon" and self.beta is not None and self.n >= 2:
            expected = beta_for_n(self.n)
            if not math.isclose(self.beta, expected, rel_tol=1e-6):
                errors.append(
                    f"--beta {self.beta} contradicts vBoN's 1/(N-1) = {expected:.6g} for N="
                    f"{self.n}: leave --beta unset, or use --method kl-rl for another weight"
                )
        if self.method == "kl-rl" and (self.beta is None or self.beta <= 0):
            errors.append("--method kl-rl needs --beta B > 0 (the KL weight), e.g. --beta 0.1")
        if self.rl_prompts is not None and self.rl_prompts < 0:
            errors.append(f"--rl-prompts must be >= 0, got {self.rl_prompts}")
        elif self.rl_prompts and not (self.method == "vbon" and self.warm_start_epochs > 0):
            errors.append(
                "--rl-prompts splits the prompts between vbon's warm start and its RL stage: "
                "it needs --method vbon and --warm-start-epochs > 0"
            )
        if self.sft_learning_rate <= 0:
            errors.append(f"--sft-learning-rate must be > 0, got {self.sft_learning_rate}")
        if self.sft_kl_coef < 0:
            errors.append(f"--sft-kl-coef must be >= 0 (0: no KL term), got {self.sft_kl_coef}")
        if self.warm_start_epochs < 0:
            errors.append(f"--warm-start-epochs must be >= 0, got {self.warm_start_epochs}")
        elif self.warm_start_epochs > 0 and self.method != "vbon":
            errors.append(
                "--warm-start-epochs applies to --method vbon only (bon-sft is the warm start "
                "alone; kl-rl has no reference samples)"
            )
        if self.sft_batches not in SFT_BATCHES:
            errors.append(
                f"--sft-batches must be one of {', '.join(SFT_BATCHES)}, got {self.sft_batches!r}"
            )
        if self.warm_start_loss not in WARM_START_LOSSES:
            errors.append(
                f"--warm-start-loss must be one of {', '.join(WARM_START_LOSSES)}, "
                f"got {self.warm_start_loss!r}"
            )
        if self.warm_start_from and not (self.method == "vbon" and self.warm_start_epochs > 0):
            errors.append(
                "--warm-start-from replaces vbon's warm start: it needs --method vbon and "
                "--warm-start-epochs > 0 (to start RL from the base, leave it out)"
            )
        if self.method == "bon-sft" and self.objective != "bound":
            errors.append("--objective applies to --method vbon only")
        positive = {
            "steps": self.steps,
            "prompts_per_step": self.prompts_per_step,
            "max_tokens": self.max_tokens,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "checkpoint_every": self.checkpoint_every,
            "eval_samples": self.eval_samples,
            "kl_window": self.kl_window,
        }
        for name, value in positive.items():
            if value < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.completions_per_prompt < 2:
            errors.append(
                "--completions-per-prompt must be >= 2: RLOO's baseline leaves one out of the "
                f"group, got {self.completions_per_prompt}"
            )
        if self.learning_rate <= 0:
            errors.append(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.num_prompts < 0 or self.eval_num_prompts < 0:
            errors.append("--num-prompts / --eval-num-prompts must be >= 0 (0: all)")
        if self.m < 1:
            errors.append(f"--m must be >= 1, got {self.m}")
        if not 0 <= self.adam_beta1 < 1:
            errors.append(f"--adam-beta1 must lie in [0, 1), got {self.adam_beta1}")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.max_kl is not None and self.max_kl < 0:
            errors.append(f"--max-kl must be >= 0 (0 disables), got {self.max_kl}")
        if self.output:
            from vbon.adapters import check_name

            try:
                check_name(Path(self.output).name)
            except ConfigError as exc:
                errors.append(f"--output: the folder name is the adapter name; {exc}")
        if errors:
            raise ConfigError("invalid trainer settings:\n  - " + "\n  - ".join(errors))

    # --- derived values ----------------------------------------------------------------------
    @property
    def kl_weight(self) -> float:
        if self.method == "vbon":
            return beta_for_n(self.n)
        if self.method == "kl-rl":
            return float(self.beta or 0.0)
        return 0.0

    @property
    def kl_stop(self) -> float | None:
        if self.max_kl is not None:
            return self.max_kl or None
        return VBON_KL_STOP_FRACTION * kl_bound(self.n) if self.method == "vbon" else None

    @property
    def adapter_name(self) -> str:
        if self.output:
            return Path(self.output).name
        if self.method == "vbon":
            return f"vbon-n{self.n}" + ("-exact" if self.objective == "exact" else "")
        if self.method == "kl-rl":
            return f"kl-rl-b{self.beta:g}"
        return f"bon-sft-n{self.n}"

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("adapters") / self.adapter_name

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) / self.adapter_name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Settings that define the run: a resumed run must match them. Output/logging/evaluation
    # choices (and the resume/overwrite switches) may differ between the two invocations.
    RESUME_IGNORED = (
        "resume",
        "overwrite",
        "config",
        "evaluate",
        "eval_prompts",
        "eval_num_prompts",
        "eval_samples",
        "max_train_minutes",
        "torch_threads",
        "output",
    )

    @property
    def lora_target_modules(self) -> list[str]:
        """--lora-targets as peft's list of module names."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def run_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUME_IGNORED}


def stable_hash(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    t = f.type if not isinstance(f.type, str) else eval(f.type)  # noqa: S307 - our own annotations
    args = [a for a in get_args(t) if a is not type(None)]
    return args[0] if args else t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train a vBoN LoRA adapter (or a baseline: --method kl-rl / bon-sft) and "
        "publish it where the gateway serves it. Every flag may also be set in --config FILE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    defaults = TrainConfig.__dataclass_fields__
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = defaults[f.name].default
        kind = _field_type(f)
        kwargs: dict[str, Any] = {"help": f"{help_text} (default: {default!r})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        else:
            kwargs["type"] = kind
        flags = [flag, "--recipe"] if f.name == "config" else [flag]
        parser.add_argument(*flags, dest=f.name, **kwargs)
    return parser


RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(text: str) -> Path:
    """--config/--recipe: a file, or the name of one of trainer/recipes/*.yaml."""
    path = Path(text)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{text}.yaml"
    if path.parent == Path(".") and named.is_file():
        return named
    raise ConfigError(
        f"config file '{text}' does not exist; give a YAML/JSON file or a recipe name "
        f"({', '.join(recipe_names()) or 'none shipped'})"
    )


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML/JSON ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings")
    known = {f.name for f in fields(TrainConfig)}
    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(
            f"config file '{path}': unknown settings {unknown}; see python -m trainer --help"
        )
    return normalised


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if ns.get("config"):
        ns["config"] = str(resolve_recipe(ns["config"]))
        values.update(load_config_file(Path(ns["config"])))
    values.update(ns)
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid trainer settings: {exc}") from exc
