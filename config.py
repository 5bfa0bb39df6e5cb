"""Every flag of train.py: its default, its help line, its allowed range (METHOD.md sections 4-6).

`check` validates a whole Config before anything is loaded and reports every problem at once;
`load_config` builds a new run's Config from the command line, or a resumed run's from its
config.json (a resumed run keeps its settings: only --steps, --device, --threads and --fsdp may change).
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from files import RunError, regular_file

# What each --box-format holds, and how it becomes [x1, y1, x2, y2] in pixels of a W x H image.
BOX_FORMATS = {
    "xyxy": lambda b, W, H: b,                                      # corners in pixels (default)
    "xywh": lambda b, W, H: (b[0], b[1], b[0] + b[2], b[1] + b[3]),  # corner + size in pixels (COCO)
    "norm1": lambda b, W, H: (b[0] * W, b[1] * H, b[2] * W, b[3] * H),
    "norm1000": lambda b, W, H: (b[0] * W / 1000, b[1] * H / 1000, b[2] * W / 1000, b[3] * H / 1000),
}


def knob(default, help, choices=None):
    """A Config field: its default, its --help line, its allowed choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # data and model
    model: str = knob("tiny", "hub id or folder of a model whose config.json's model_type is one of {families}, "
                              "or 'tiny' (built-in)")
    dataset: str = knob("synth:mix", "training JSONL or a built-in set: synth:{grounding} (grounding), "
                                     "synth:{classes} (--task classify)")
    image_root: str = knob(None, "folder image paths are relative to (default: the JSONL's folder)")
    box_format: str = knob("xyxy", "what the JSONL boxes hold: xyxy pixels, xywh pixels, norm1 (0..1) or "
                                   "norm1000 (0..1000)", tuple(BOX_FORMATS))
    skip_invalid: bool = knob(False, "drop invalid records (and say how many) instead of stopping")
    train_size: int = knob(None, "train on the first N records of the training set only (default: all of them), "
                                 "a built-in set's too: a small set SFT can overfit, as on a real benchmark")
    eval_dataset: str = knob("auto", "evaluation set; 'auto' = the synthetic test split, 'none' = skip")
    eval_every: int = knob(0, "evaluate every N steps (0: only at the end)")
    eval_n: int = knob(200, "evaluate on at most N samples")
    init: str = knob(None, "start from this checkpoint folder (e.g. an SFT run) instead of --model")
    ref_model: str = knob(None, "KL reference policy (default: the starting policy); 'none' with --beta 0")
    template: str = knob(None, "prompt template (default: short for tiny, r1 otherwise)", ("r1", "short"))
    min_pixels: int = knob(None, "processor min_pixels (default: the model's; tiny: 56*56)")
    max_pixels: int = knob(None, "processor max_pixels (default: the model's; tiny: 112*112)")
    # classification (VRFT-Aug, METHOD.md section 10)
    task: str = knob("ground", "ground: grounding (MedLoc-R1), one box per query, or several where the data gives "
                               "a record's boxes as a list (then ground-multi, said at the start); ground-multi: "
                               "several boxes per query (METHOD.md 4.2); classify: one class per image (VRFT-Aug)",
                      ("ground", "ground-multi", "classify"))
    labels: str = knob(None, "classify: labels file (class names in order, descriptions, ordinal); "
                             "synth:grade|type carry their own")
    knowledge: bool | str = knob(False, "classify, PA_p: put each class's description in the prompt; alone: "
                                        "those of --labels or the synthetic set; --knowledge FILE: those of the "
                                        "labels file FILE (the dataset's classes, in order; also --labels if none)")
    mfrs_weight: float = knob(0.0, "classify, ordinal sets: gamma, weight of the multi-grade fuzzy reward")
    mfrs_decay: float = knob(0.25, "classify: R_MFRS = decay ** |grade error| (0.25: 1 / 0.25 / 0.0625 ...)")
    recite_weight: float = knob(0.0, "classify: delta, weight of the recitation reward (< 0 penalises it)")
    # algorithm (METHOD.md section 5)
    algo: str = knob("grpo", "grpo, or sft: supervised on the GT answers (the SFT baseline)", ("grpo", "sft"))
    steps: int = knob(500, "optimizer steps in total (with --resume: the total to reach)")
    batch_prompts: int = knob(4, "B: prompts per step")
    group_size: int = knob(8, "G: completions per prompt")
    temperature: float = knob(0.9, "sampling temperature of the rollouts (top_k=0, top_p=1)")
    max_new_tokens: int = knob(None, "completion length limit (default: 24 tiny, 256 otherwise)")
    beta: float = knob(0.04, "KL weight; 0 loads no reference model")
    eps: float = knob(0.2, "clip range below 1 (and above, unless --eps-high)")
    eps_high: float = knob(None, "clip range above 1 (DAPO clip-higher); default eps")
    loss_type: str = knob("grpo", "grpo: sequence mean; bnpo: token mean; dr_grpo: sum / (N*T) (Dr. GRPO, "
                                  "arXiv 2503.20783); cispo: the clipped ratio as a stop-gradient weight on log pi, "
                                  "token mean (CISPO, MiniMax-M1, arXiv 2506.13585)", ("grpo", "bnpo", "dr_grpo", "cispo"))
    ratio: str = knob("token", "importance ratio: token (PPO's, per token); sequence: GSPO's s_i = exp(mean_t "
                               "log pi - log pi_old), clipped per completion (arXiv 2507.18071; METHOD.md 5.9)",
                      ("token", "sequence"))
    adv_scale: str = knob("group", "group: divide by group std; none: Dr. GRPO", ("group", "none"))
    lr: float = knob(None, "AdamW learning rate (default: 1e-6 as in the paper; 1e-4 for tiny)")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    grad_clip: float = knob(1.0, "max gradient norm")
    micro_batch: int = knob(0, "sequences per forward/backward (0: all B*G at once); whole groups")
    updates_per_rollout: int = knob(1, "mu: optimizer steps on each rollout (> 1 lets the ratio clip)")
    dynamic_sampling: bool = knob(False, "DAPO's dynamic sampling (arXiv 2503.14476): drop the groups whose G rewards "
                                         "are all equal, draw more prompts until B informative groups (METHOD.md 5.8)")
    recipe: str = knob(None, "a preset of the flags above, which flags given beside it override: dapo = clip-higher "
                             "--eps-high 0.28, token-mean loss (bnpo), --dynamic-sampling, --beta 0 (DAPO, "
                             "arXiv 2503.14476; METHOD.md 5.8)", ("dapo",))
    max_resample: int = knob(4, "--dynamic-sampling: extra rounds of B prompts at most, then the step trains on "
                                "the informative groups it has")
    # reward (METHOD.md section 4) and schedule (section 6)
    schedule: str = knob("medloc", "tau schedule", ("medloc", "fixed", "raw-iou", "stages"))
    reward: str = knob(None, "accuracy reward (default: iou for raw-iou, else threshold)",
                        ("threshold", "iou", "giou"))
    w_fmt: float = knob(1.0, "weight of the format reward")
    tau: float = knob(0.5, "fixed schedule: the threshold")
    tau0: float = knob(0.3, "medloc: starting threshold")
    tau_target: float = knob(0.8, "medloc: final threshold")
    window: int = knob(30, "medloc: N, steps in the sliding window")
    margin: float = knob(0.10, "medloc: Delta, required mean IoU above tau")
    step_rule: str = knob("piecewise", "medloc: step size rule", ("piecewise", "linear", "cosine", "constant"))
    constant_delta: float = knob(0.15, "medloc: step size of the constant rule")
    delta0: float = knob(0.2, "medloc: first step of the linear / cosine rules")
    min_delta: float = knob(0.05, "medloc: smallest step of the linear / cosine rules")
    no_reward_check: bool = knob(False, "medloc ablation: drop r_bar >= P(tau)")
    no_stability_check: bool = knob(False, "medloc ablation: drop sigma <= S(tau)")
    no_margin_check: bool = knob(False, "medloc ablation: drop m_bar >= Delta")
    stages: str = knob("0:0.5,0.3333:0.65,0.6667:0.8", "stages schedule: fraction:tau pairs")
    # warm start, run folder, machine
    sft_steps: int = knob(None, "SFT warm-start steps before GRPO from the --model's weights (default: none; "
                                "the tiny model's grounding runs start from its shipped warm start, its "
                                "classification runs from 1200 SFT steps)")
    sft_lr: float = knob(1e-3, "learning rate of the warm start")
    sft_box_scale: str = knob(None, "SFT targets (--algo sft, the warm start): the GT box scaled about its centre "
                                    "by a factor drawn per example from LO,HI (e.g. 1.15,1.35), clipped to the "
                                    "image: a start whose boxes are found but loose (METHOD.md 8)")
    sft_batch: int = knob(16, "batch size of the warm start")
    out: str = knob(None, "run folder (default: runs/<schedule>-<time>)")
    resume: str = knob(None, "continue the run in this folder from its latest checkpoint")
    save_every: int = knob(50, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = knob(2, "how many step checkpoints to keep (2: one to fall back on)")
    seed: int = knob(0, "seed of data order, sampling and the tiny model's init")
    device: str = knob("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    precision: str = knob("auto", "auto: bf16-mixed on CUDA, fp32 on CPU",
                           ("auto", "bf16-mixed", "bf16", "fp32"))
    final_dtype: str = knob("published", "dtype of final/: the model's published one (bf16 for Qwen; "
                                         "checkpoints stay fp32 for an exact resume), fp32 or bf16",
                            ("published", "fp32", "bf16"))
    gradient_checkpointing: bool = knob(False, "trade compute for memory (real models on one GPU)")
    compile: bool = knob(False, "torch.compile the sampler's decoding step (its first rollouts pay for the "
                                "compilation; README says when it pays off)")
    freeze_vision: bool = knob(False, "train the language model only")
    fsdp: bool | str = knob(False, "under torchrun: split the weights, gradients and optimizer state over the "
                                   "processes (FSDP2) instead of a whole copy on each; --fsdp hybrid: split within "
                                   "groups of --shard-size processes (a node's), replicated across them",
                            ("hybrid",))
    shard_size: int = knob(0, "--fsdp hybrid: processes each copy of the model is split over (0: torchrun's "
                              "--nproc-per-node, one node)")
    lora_rank: int = knob(0, "LoRA rank r (0: full fine-tuning); the reference is the model without adapters")
    lora_alpha: float = knob(16.0, "LoRA scale numerator: the update is (alpha / r) B A")
    lora_targets: str = knob(None, "regex of the linear layers to adapt (default: the language model's "
                                   "attention and MLP projections, a linear-attention layer's qkv, z and output ones; "
                                   "a MoE's experts are no nn.Linear and stay out)")
    lora_dropout: float = knob(0.0, "dropout on the LoRA branch input")
    threads: int = knob(0, "torch CPU threads (0: torch's default)")
    report_to: str = knob("none", "where the metrics also go: none, tensorboard, wandb, or both comma-separated "
                                  "(trackers.py; rank 0 only)")
    log_samples_every: int = knob(0, "with --report-to: every N steps, a few sampled completions with their boxes, "
                                     "rewards and IoU (0: never)")
    run_group: str = knob(None, "the W&B group of this run (ablate.py gives its study's rows one)")
    checkpoint: str = knob("whole", "how checkpoints are written: whole (a model folder, gathered to rank 0) or "
                                    "sharded (each rank its own shards, torch.distributed.checkpoint); either "
                                    "resumes under any process count", ("whole", "sharded"))
    dist_timeout: int = knob(600, "under torchrun: seconds a collective waits for the other ranks; past it the "
                                  "run stops, naming the rank that stopped or froze (resumable)")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (not the whole usage), with the flag meant where a
    spelling of another tool's (TRL's --num_generations) or an underscore (--group_size) is close."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unknown flag {unknown[0]}" + did_you_mean(unknown[0], self))
        return known


# TRL's GRPOTrainer arguments (and a few of transformers' TrainingArguments) -> this train.py's flags
OTHER_TOOLS = {"num_generations": "--group-size", "learning_rate": "--lr", "output_dir": "--out",
               "per_device_train_batch_size": "--batch-prompts", "max_completion_length": "--max-new-tokens",
               "max_steps": "--steps", "model_name_or_path": "--model", "dataset_name": "--dataset",
               "epsilon": "--eps", "epsilon_high": "--eps-high", "num_iterations": "--updates-per-rollout",
               "scale_rewards": "--adv-scale", "save_steps": "--save-every", "max_grad_norm": "--grad-clip",
               "lora_r": "--lora-rank", "lora_target_modules": "--lora-targets", "bf16": "--precision bf16-mixed",
               "resume_from_checkpoint": "--resume"}


def did_you_mean(token, parser):
    """': did you mean --x?' for an unknown flag, or nothing when no flag is close."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    name = token.split("=")[0].lstrip("-")
    dashed = "--" + name.replace("_", "-")
    guess = (dashed if dashed in flags else OTHER_TOOLS.get(name.replace("-", "_"))
             or next(iter(difflib.get_close_matches(dashed, flags, n=1, cutoff=0.75)), None))
    return f": did you mean {guess}?" if guess else ""


def help_line(f, tables):
    """A flag's --help line: what it does, the values it allows (its choices or its RANGES entry)
    and its default, once; {families}, {grounding} and {classes} filled from the tables that hold them."""
    text = f.metadata["help"].format(**tables) if tables else f.metadata["help"]
    if f.name in RANGES:
        text += f"; allowed: {RANGES[f.name][1]}"
    if "default" not in f.metadata["help"] and f.type is not bool:
        text += f" (default: {f.default})"
    return text


def help_tables():
    """The names --help lists, read from where they are defined (imported only for --help: the
    model families load transformers)."""
    from model import FAMILIES
    from synth import CLASS_KINDS, GROUNDING_KINDS
    return {"families": ", ".join(FAMILIES), "grounding": "|".join(GROUNDING_KINDS), "classes": "|".join(CLASS_KINDS)}


def parse_args(argv=None):
    """Only the flags given on the command line, so a resumed run can tell them from defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(help_tables() if "-h" in argv or "--help" in argv else None)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None and v is not False}


def parser(tables=None):
    """train.py's command line, a flag per Config field; `tables` fill the help lines (help_tables)."""
    p = OneLineParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=help_line(f, tables))
        elif f.type == bool | str:  # a switch that may name a file, or one of its choices
            p.add_argument(flag, nargs="?", const=True, default=None, help=help_line(f, tables),
                           metavar="|".join(f.metadata["choices"] or ["FILE"]))
        else:
            p.add_argument(flag, type=f.type, default=None, choices=f.metadata["choices"], help=help_line(f, tables))
    return p


# ----------------------------------------------------------------------------- allowed ranges
def _between(lo, hi, lo_open=False, hi_open=False):
    words = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return (lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)), words


def _at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _positive():
    return (lambda v: v > 0), "> 0"


MERGED_PATCH = 28 * 28  # one merged 2x2 block of 14-pixel patches: the smallest image Qwen encodes
RANGES = {  # flag -> (test, allowed values in words); None means "the model's default"
    "eval_every": _at_least(0), "eval_n": _at_least(1), "train_size": _at_least(1),
    "min_pixels": _at_least(MERGED_PATCH), "max_pixels": _at_least(MERGED_PATCH),
    "steps": _at_least(1), "batch_prompts": _at_least(1), "group_size": _at_least(2),
    "temperature": _between(0, 10, lo_open=True), "max_new_tokens": _between(1, 32768),
    "beta": _between(0, 100), "eps": _between(0, 1, lo_open=True, hi_open=True),
    "eps_high": _between(0, 10, lo_open=True), "lr": _positive(), "weight_decay": _between(0, 1),
    "grad_clip": _positive(), "micro_batch": _at_least(0), "updates_per_rollout": _between(1, 100),
    "max_resample": _between(1, 100),
    "w_fmt": _between(0, 100), "tau": _between(0, 1), "tau0": _between(0, 1), "tau_target": _between(0, 1),
    "window": _at_least(2), "margin": _between(0, 1), "constant_delta": _between(0, 1, lo_open=True),
    "delta0": _between(0, 1, lo_open=True), "min_delta": _between(0, 1, lo_open=True),
    "sft_steps": _at_least(0), "sft_lr": _positive(), "sft_batch": _at_least(1), "save_every": _at_least(1),
    "keep_checkpoints": _at_least(1), "seed": _at_least(0), "threads": _between(0, 1024),
    "lora_rank": _between(0, 4096), "mfrs_weight": _between(0, 10), "mfrs_decay": _between(0, 1),
    "recite_weight": _between(-10, 10), "lora_alpha": _positive(), "lora_dropout": _between(0, 1, hi_open=True),
    "log_samples_every": _at_least(0), "shard_size": _at_least(0), "dist_timeout": _between(10, 7 * 24 * 3600),
}


def flag(name):
    return "--" + name.replace("_", "-")


def check(cfg, processes=1):
    """Every impossible setting, in one message, before any data or model is loaded. Under
    torchrun the B prompts (and the warm start's batch) split into whole groups per process."""
    problems = [f"--{name} {n} does not split over {processes} processes" for name, n in
                (("batch-prompts", cfg.batch_prompts), ("sft-batch", cfg.sft_batch)) if n % processes]
    if processes > 1 and cfg.micro_batch and (cfg.batch_prompts // processes * cfg.group_size) % cfg.micro_batch:
        problems.append(f"--micro-batch {cfg.micro_batch} must divide each process's "
                        f"{cfg.batch_prompts // processes * cfg.group_size} sequences")
    for name, (ok, words) in RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag(name)} {value}: not a finite number")
        elif not ok(value):
            problems.append(f"{flag(name)} {value}: must be {words}")
    n = cfg.batch_prompts * cfg.group_size
    if cfg.micro_batch and (n % cfg.micro_batch or cfg.micro_batch % cfg.group_size):
        problems.append(f"--micro-batch {cfg.micro_batch}: must hold whole groups of G = {cfg.group_size} "
                        f"and divide B*G = {n}")
    if cfg.tau0 > cfg.tau_target:
        problems.append(f"--tau0 {cfg.tau0} is above --tau-target {cfg.tau_target}: tau never decreases")
    if cfg.min_pixels and cfg.max_pixels and cfg.min_pixels > cfg.max_pixels:
        problems.append(f"--min-pixels {cfg.min_pixels} is above --max-pixels {cfg.max_pixels}")
    if cfg.beta > 0 and cfg.ref_model == "none":
        problems.append(f"--beta {cfg.beta} needs a reference model; use --beta 0 with --ref-model none")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and not (cfg.out or cfg.resume):
        problems.append("torchrun --max-restarts needs --out RUN: a restarted worker resumes the run in that folder")
    if cfg.reward == "threshold" and cfg.schedule == "raw-iou":
        problems.append("--schedule raw-iou has no tau: use --reward iou or giou")
    try:
        parse_stages(cfg.stages)
    except ValueError as e:
        problems.append(f"--stages {cfg.stages!r}: {e}")
    problems += tracker_problems(cfg.report_to, cfg.resume or cfg.out)
    if cfg.log_samples_every and cfg.report_to in (None, "none"):
        problems.append(f"--log-samples-every {cfg.log_samples_every}: goes with --report-to (the tracker it logs to)")
    if cfg.sft_box_scale is not None:
        try:
            parse_box_scale(cfg.sft_box_scale)
        except ValueError as e:
            problems.append(f"--sft-box-scale {cfg.sft_box_scale!r}: {e}")
    problems += device_problems(cfg.device) + path_problems(cfg) + idle_flag_problems(cfg)
    if cfg.fsdp and "LOCAL_RANK" not in os.environ:
        problems.append("--fsdp splits the model over torchrun's processes: launch with "
                        "torchrun --nproc_per_node K train.py --fsdp ...")
    if cfg.fsdp not in (False, True, "hybrid"):
        problems.append(f"--fsdp {cfg.fsdp}: --fsdp alone (split over every process) or --fsdp hybrid")
    if cfg.shard_size and (cfg.fsdp != "hybrid" or processes % cfg.shard_size):
        problems.append(f"--shard-size {cfg.shard_size}: with --fsdp hybrid, a divisor of the {processes} processes")
    if cfg.compile and cfg.fsdp:  # FSDP2's hooks inside a compiled decoding step: not tried here
        problems.append("--compile and --fsdp together are not supported: drop one of them")
    if cfg.recite_weight and not cfg.knowledge:
        problems.append(f"--recite-weight {cfg.recite_weight} needs --knowledge: it scores the reasoning "
                        "against the injected class descriptions")
    if cfg.task != "classify" and (cfg.labels or cfg.knowledge or cfg.mfrs_weight or cfg.recite_weight):
        problems.append("--labels, --knowledge, --mfrs-weight and --recite-weight belong to --task classify")
    if cfg.task == "ground-multi" and (cfg.sft_box_scale or cfg.reward == "giou"):
        problems.append("--sft-box-scale and --reward giou have no several-box form (--task ground-multi)")
    for name in ("labels", "knowledge"):  # --knowledge alone is True: the descriptions of --labels
        if isinstance(getattr(cfg, name), str):
            try:
                regular_file(getattr(cfg, name), f"{flag(name)} (a labels file)")
            except ValueError as e:
                problems.append(str(e))
    if cfg.lora_targets is not None:
        try:
            re.compile(cfg.lora_targets)
        except re.error as e:
            problems.append(f"--lora-targets {cfg.lora_targets!r}: not a regular expression ({e})")
    if cfg.fsdp and cfg.lora_rank:
        problems.append("--fsdp with --lora-rank: LoRA trains a few adapters on a frozen base that fits "
                        "each GPU; run it data parallel (without --fsdp)")
    if cfg.ratio == "sequence" and cfg.loss_type == "cispo":
        problems.append("--ratio sequence with --loss-type cispo: CISPO weights each token by its own clipped "
                        "ratio; GSPO clips the sequence's (pick one)")
    if problems:
        raise RunError("\n       ".join(problems))


def device_problems(device):
    if device in ("auto", "cpu"):
        return []
    import torch  # here, not at the top: ablate.py reads this file's flags without loading torch
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            return [f"--device {device}: CUDA is not available on this machine (use --device cpu)"]
        if device[5:] and int(device[5:]) >= torch.cuda.device_count():
            return [f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"]
        return []
    return [f"--device {device!r}: expected auto, cpu, cuda or cuda:N"]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "Qwen/Qwen2.5-VL-3B-Instruct", "gpt2"


def model_problem(flag, name):
    """A model flag names a folder, a hub id or 'tiny'; a path that names nothing is said plainly
    (from_pretrained would call it a malformed repository id)."""
    if name in (None, "tiny", "none") or os.path.isdir(name):
        return []
    if os.path.exists(name):
        return [f"{flag} {name}: not a model folder (a file)"]
    return [] if HUB_ID.fullmatch(name) else [f"{flag} {name}: not a model folder (no such folder)"]


def data_problem(flag, spec):
    """A data set flag names a file or a built-in set synth:KIND[:SPLIT] (synth.py's kinds)."""
    if spec in (None, "auto", "none"):
        return []
    if spec.startswith("synth:"):
        from synth import CLASS_KINDS, GROUNDING_KINDS  # numpy and PIL only
        kinds = GROUNDING_KINDS + tuple(CLASS_KINDS)
        kind = spec.split(":")[1]
        return [] if kind in kinds else [f"{flag} {spec}: unknown synthetic kind {kind!r}: expected one of {', '.join(kinds)}"]
    if os.path.isdir(spec):
        return [f"{flag} {spec}: a folder; give the JSONL file"]
    return [] if os.path.exists(spec) else [f"{flag} {spec}: no such file (and not a synth:KIND spec)"]


def path_problems(cfg):
    """Every path the flags name that names nothing, before torch loads (train.py's first second)."""
    problems = model_problem("--model", cfg.model) + model_problem("--init", cfg.init)
    problems += model_problem("--ref-model", cfg.ref_model)
    problems += data_problem("--dataset", cfg.dataset) + data_problem("--eval-dataset", cfg.eval_dataset)
    if cfg.image_root and not os.path.isdir(cfg.image_root):
        problems.append(f"--image-root {cfg.image_root}: no such folder")
    for name in ("labels", "knowledge"):
        path = getattr(cfg, name)
        if isinstance(path, str) and not os.path.isfile(path):
            problems.append(f"{flag(name)} {path}: no such file")
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        problems.append(f"--out {cfg.out}: a file, not a folder; choose another --out")
    return problems


def idle_flag_problems(cfg):
    """Flags that would do nothing beside the others given: refused, never silently ignored."""
    problems = []
    if cfg.max_resample != Config.max_resample and not cfg.dynamic_sampling:
        problems.append(f"--max-resample {cfg.max_resample} without --dynamic-sampling: it bounds dynamic sampling's "
                        "extra rounds and would do nothing")
    if cfg.dynamic_sampling and cfg.algo == "sft":
        problems.append("--dynamic-sampling with --algo sft: supervised steps sample no groups to drop")
    return problems


def tracker_problems(report_to, run_dir=None):
    """--report-to names known trackers whose packages are installed and that can start here
    (trackers.problems), said before anything loads."""
    import importlib.util
    from trackers import PACKAGES, parse_report_to, problems
    try:
        names = parse_report_to(report_to)
    except ValueError as e:
        return [f"--report-to {e}"]
    missing = [f"--report-to {n} needs the {PACKAGES[n]} package: pip install {PACKAGES[n]}" for n in names
               if importlib.util.find_spec(PACKAGES[n]) is None]
    return missing or problems(names, run_dir)


def parse_box_scale(text):
    """'LO,HI' -> (lo, hi), 0 < lo <= hi <= 10; None stays None (the GT boxes themselves)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError("two factors LO,HI, e.g. 1.15,1.35")
    if not (0 < lo <= hi <= 10):
        raise ValueError("need 0 < LO <= HI <= 10")
    return lo, hi


def parse_stages(text):
    """'0:0.5,0.5:0.8' -> [(0.0, 0.5), (0.5, 0.8)]: fractions rising from 0 below 1, taus in [0, 1]."""
    try:
        pairs = [tuple(float(x) for x in pair.split(":")) for pair in text.split(",")]
    except ValueError:
        pairs = [()]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("expected fraction:tau pairs, e.g. 0:0.5,0.5:0.8")
    fractions = [f for f, _ in pairs]
    if fractions[0] != 0 or fractions != sorted(set(fractions)) or fractions[-1] >= 1:
        raise ValueError("fractions must start at 0 and rise below 1, e.g. 0:0.5,0.5:0.8")
    if not all(0 <= t <= 1 for _, t in pairs):
        raise ValueError("each tau must be in [0, 1]")
    return pairs


# ----------------------------------------------------------------------------- new or resumed
RECIPES = {"dapo": dict(eps_high=0.28, loss_type="bnpo", dynamic_sampling=True, beta=0.0)}
MAY_CHANGE_ON_RESUME = ("steps", "resume", "device", "threads", "fsdp", "shard_size", "final_dtype", "report_to", "log_samples_every",
                        "run_group", "dist_timeout", "checkpoint")  # how a launch runs or reports, not what it computes
PATH_KEYS = ("init", "ref_model", "model", "dataset", "eval_dataset", "image_root", "labels", "knowledge")  # "{run}/..." in config.json


def refuse_early(argv):
    """train.py's flags and paths checked before torch and transformers load, so that a mistake is
    said in a second (start.configure checks them all again, with the model's configs). Under a
    launcher the ranks agree on one verdict there instead (start.configure): a node that alone
    stopped here would leave the others waiting at the rendezvous."""
    if "MASTER_ADDR" in os.environ or "-h" in argv or "--help" in argv:
        return
    try:
        check(load_config(parse_args(argv)))
    except RunError as e:
        raise SystemExit(f"error: {e}")


def load_config(given, restarted=False):
    """A new run's Config from the flags; a resumed run's from its config.json, refusing any flag
    that would change the run (anything but --steps, --device, --threads and --fsdp). `restarted`:
    torchrun --max-restarts started this worker again (dist.join, agreed by every rank): a run
    that had begun in --out goes on from its last checkpoint, as --resume would, with no flag to add."""
    out = given.get("out")
    if "resume" not in given and restarted and out and os.path.exists(os.path.join(out, "config.json")):
        given = {**given, "resume": out}
    if "resume" not in given:
        return Config(**{**RECIPES.get(given.get("recipe"), {}), **given})  # the flags given win over the recipe
    run_dir = given["resume"]
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        if int(os.environ.get("RANK", "0")) > 0:  # said only if rank 0 has no problem (dist.agree): it sees the folder
            raise RunError(f"--resume {run_dir}: this rank's host cannot see the run folder that rank 0 sees (no "
                           "config.json there): every node needs the run folder on the same shared storage "
                           "(docs/clusters.md)")
        raise RunError(f"--resume {run_dir}: no config.json there (not a run folder)")
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})")
    known = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(saved, dict) or set(saved) - known:
        raise RunError(f"{path}: not a config.json written by this train.py")
    changed = [f"{flag(k)} {v} (the run has {saved.get(k)})" for k, v in given.items()
               if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != v]
    if changed:
        raise RunError(f"--resume keeps the run's settings; refused: {', '.join(changed)}. "
                       f"To change them, start a new run with --init {run_dir}/final or a checkpoint's model/")
    saved.update({k: v for k, v in given.items() if k in MAY_CHANGE_ON_RESUME})
    saved["fsdp"] = given.get("fsdp", False)  # how this launch splits the work, not the run's maths
    saved["shard_size"] = given.get("shard_size", 0)
    for key in PATH_KEYS:
        saved[key] = from_config_path(saved.get(key), run_dir)
    return Config(**saved)



def to_config_path(path, run_dir):
    """Paths inside the run become "{run}/...", others absolute: the folder can move, and resume
    works from any working directory."""
    if not isinstance(path, str) or path in ("tiny", "none") or not os.path.exists(path):
        return path  # a hub id, a built-in name, a switch or None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    return "{run}/" + rel if not rel.startswith("..") else os.path.abspath(path)


def from_config_path(path, run_dir):
    return os.path.join(run_dir, path[len("{run}/"):]) if isinstance(path, str) and path.startswith("{run}/") else path
