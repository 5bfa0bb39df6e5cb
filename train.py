"""MedLoc-R1: GRPO fine-tuning of a VLM for visual grounding with a curriculum on the IoU threshold.

    python train.py                                   # tiny Qwen2.5-VL + synthetic data, whole method
    python train.py --dataset train.jsonl --model Qwen/Qwen2.5-VL-3B-Instruct --gradient-checkpointing
    python train.py --schedule fixed --tau 0.5        # a baseline; see --help for every knob

One step (METHOD.md section 5): B prompts -> G completions each -> rewards under the schedule's tau
-> group advantages -> clipped surrogate + KL -> AdamW -> schedule update -> log.
"""
import argparse
import dataclasses
import functools
import glob
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import grpo
from data import DataError, load_dataset
from eval import evaluate, format_table, write_json
from model import answer_text, load_vlm
from reward import from_image_frame, score_completions
from scheduler import make_schedule


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # data and model
    model: str = opt("tiny", "hub id or folder of Qwen2.5-VL / Qwen2-VL, or 'tiny' (built-in)")
    dataset: str = opt("synth:mix", "training JSONL or synth:derm|xray|us|mix")
    image_root: str = opt(None, "folder image paths are relative to (default: the JSONL's folder)")
    skip_invalid: bool = opt(False, "drop invalid records (and say how many) instead of stopping")
    eval_dataset: str = opt("auto", "evaluation set; 'auto' = the synthetic test split, 'none' = skip")
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)")
    eval_n: int = opt(200, "evaluate on at most N samples")
    init: str = opt(None, "start from this checkpoint folder (e.g. an SFT run) instead of --model")
    ref_model: str = opt(None, "KL reference policy (default: the starting policy); 'none' with --beta 0")
    template: str = opt(None, "prompt template (default: short for tiny, r1 otherwise)", ("r1", "short"))
    min_pixels: int = opt(None, "processor min_pixels (default: the model's; tiny: 56*56)")
    max_pixels: int = opt(None, "processor max_pixels (default: the model's; tiny: 112*112)")
    # algorithm (METHOD.md section 5)
    algo: str = opt("grpo", "grpo, or sft: supervised on the GT answers (the SFT baseline)", ("grpo", "sft"))
    steps: int = opt(150, "optimizer steps in total (with --resume: the total to reach)")
    batch_prompts: int = opt(4, "B: prompts per step")
    group_size: int = opt(8, "G: completions per prompt")
    temperature: float = opt(0.9, "sampling temperature of the rollouts (top_k=0, top_p=1)")
    max_new_tokens: int = opt(None, "completion length limit (default: 24 tiny, 256 otherwise)")
    beta: float = opt(0.04, "KL weight; 0 loads no reference model")
    eps: float = opt(0.2, "clip range below 1 (and above, unless --eps-high)")
    eps_high: float = opt(None, "clip range above 1 (DAPO clip-higher); default eps")
    loss_type: str = opt("grpo", "grpo: sequence mean; bnpo: token mean; dr_grpo: sum / (N*T)",
                         ("grpo", "bnpo", "dr_grpo"))
    adv_scale: str = opt("group", "group: divide by group std; none: Dr. GRPO", ("group", "none"))
    lr: float = opt(None, "AdamW learning rate (default: 1e-6 as in the paper; 1e-4 for tiny)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max gradient norm")
    micro_batch: int = opt(0, "sequences per forward/backward (0: all B*G at once); whole groups")
    # reward (METHOD.md section 4) and schedule (section 6)
    schedule: str = opt("medloc", "tau schedule", ("medloc", "fixed", "raw-iou", "stages"))
    reward: str = opt(None, "accuracy reward (default: iou for raw-iou, else threshold)",
                      ("threshold", "iou", "giou"))
    w_fmt: float = opt(1.0, "weight of the format reward")
    tau: float = opt(0.5, "fixed schedule: the threshold")
    tau0: float = opt(0.3, "medloc: starting threshold")
    tau_target: float = opt(0.8, "medloc: final threshold")
    window: int = opt(30, "medloc: N, steps in the sliding window")
    margin: float = opt(0.10, "medloc: Delta, required mean IoU above tau")
    step_rule: str = opt("piecewise", "medloc: step size rule", ("piecewise", "linear", "cosine", "constant"))
    constant_delta: float = opt(0.15, "medloc: step size of the constant rule")
    delta0: float = opt(0.2, "medloc: first step of the linear / cosine rules")
    min_delta: float = opt(0.05, "medloc: smallest step of the linear / cosine rules")
    no_reward_check: bool = opt(False, "medloc ablation: drop r_bar >= P(tau)")
    no_stability_check: bool = opt(False, "medloc ablation: drop sigma <= S(tau)")
    no_margin_check: bool = opt(False, "medloc ablation: drop m_bar >= Delta")
    stages: str = opt("0:0.5,0.3333:0.65,0.6667:0.8", "stages schedule: fraction:tau pairs")
    # warm start, run folder, machine
    sft_steps: int = opt(None, "SFT warm-start steps before GRPO (default: 1200 for a fresh tiny, else 0)")
    sft_lr: float = opt(1e-3, "learning rate of the warm start")
    sft_batch: int = opt(16, "batch size of the warm start")
    out: str = opt(None, "run folder (default: runs/<schedule>-<time>)")
    resume: str = opt(None, "continue the run in this folder from its latest checkpoint")
    save_every: int = opt(50, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(1, "how many step checkpoints to keep")
    seed: int = opt(0, "seed of data order, sampling and the tiny model's init")
    device: str = opt("auto", "auto (CUDA if present), cpu or cuda")
    precision: str = opt("auto", "auto: bf16-mixed on CUDA, fp32 on CPU",
                         ("auto", "bf16-mixed", "bf16", "fp32"))
    gradient_checkpointing: bool = opt(False, "trade compute for memory (real models on one GPU)")
    freeze_vision: bool = opt(False, "train the language model only")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")


def parse_args(argv=None):
    """Only the flags given on the command line, so a resumed run can tell them from defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=None, choices=f.metadata["choices"],
                           help=f.metadata["help"] + f" (default: {f.default})")
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None and v is not False}


# ----------------------------------------------------------------------------- set-up
def resolve(cfg, vlm):
    """Fill the defaults that depend on the model (tiny vs pretrained)."""
    tiny_fresh = vlm.is_tiny and cfg.init is None and cfg.model == "tiny"
    cfg.lr = cfg.lr if cfg.lr is not None else (1e-4 if vlm.is_tiny else 1e-6)
    cfg.max_new_tokens = cfg.max_new_tokens or (24 if vlm.is_tiny else 256)
    if cfg.sft_steps is None:
        cfg.sft_steps = 1200 if tiny_fresh and cfg.algo == "grpo" else 0
    cfg.reward = cfg.reward or ("iou" if cfg.schedule == "raw-iou" else "threshold")


def check(cfg):
    """Impossible settings fail here, before any model is loaded."""
    problems = []
    if cfg.group_size < 2:
        problems.append(f"--group-size {cfg.group_size}: GRPO needs G >= 2 to compare completions")
    if cfg.batch_prompts < 1:
        problems.append("--batch-prompts must be at least 1")
    n = cfg.batch_prompts * cfg.group_size
    if cfg.micro_batch and (n % cfg.micro_batch or cfg.micro_batch % cfg.group_size):
        problems.append(f"--micro-batch {cfg.micro_batch} must hold whole groups of {cfg.group_size} "
                        f"and divide B*G = {n}")
    if cfg.beta > 0 and cfg.ref_model == "none":
        problems.append(f"--beta {cfg.beta} needs a reference model; use --beta 0 with --ref-model none")
    if cfg.reward == "threshold" and cfg.schedule == "raw-iou":
        problems.append("--schedule raw-iou has no tau: use --reward iou or giou")
    try:
        parse_stages(cfg.stages)
    except ValueError:
        problems.append(f"--stages {cfg.stages!r}: expected fraction:tau pairs, e.g. 0:0.5,0.5:0.8")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def parse_stages(text):
    """'0:0.5,0.5:0.8' -> [(0.0, 0.5), (0.5, 0.8)]."""
    pairs = [tuple(float(x) for x in pair.split(":")) for pair in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(text)
    return pairs


def make_run_schedule(cfg):
    """The schedule named by --schedule, with its flags (METHOD.md section 6)."""
    if cfg.schedule == "medloc":
        return make_schedule("medloc", tau0=cfg.tau0, tau_target=cfg.tau_target, window=cfg.window,
                             margin=cfg.margin, step_rule=cfg.step_rule, delta0=cfg.delta0,
                             min_delta=cfg.min_delta, constant_delta=cfg.constant_delta,
                             use_reward=not cfg.no_reward_check, use_stability=not cfg.no_stability_check,
                             use_margin=not cfg.no_margin_check)
    if cfg.schedule == "fixed":
        return make_schedule("fixed", tau=cfg.tau)
    if cfg.schedule == "stages":
        return make_schedule("stages", stages=parse_stages(cfg.stages), total_steps=cfg.steps)
    return make_schedule(cfg.schedule)


def default_eval_spec(cfg):
    """'auto': the test split of a synthetic training set; no evaluation for a JSONL set."""
    if cfg.eval_dataset != "auto":
        return cfg.eval_dataset
    return f"synth:{cfg.dataset.split(':')[1]}:test" if cfg.dataset.startswith("synth:") else "none"


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def prompt_indices(step, batch, n, seed):
    """Dataset rows of `step`: a fresh seeded permutation per epoch, so a resumed run sees the same."""
    rows = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n)
        rows.append(int(epoch_order(seed, epoch, n)[k]))  # one permutation per epoch, not per row
    return rows


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, step, policy, optimizer, schedule, keep):
    """checkpoint-<step>/ = model folder + trainer state; written to a temp folder, then renamed."""
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(os.path.join(tmp, "model"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "rng": rng_state()}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(glob.glob(os.path.join(run_dir, "checkpoint-[0-9]*[0-9]")))[:-keep]:
        shutil.rmtree(old)  # only after the new one is complete
    return final


def latest_checkpoint(run_dir):
    done = sorted(glob.glob(os.path.join(run_dir, "checkpoint-[0-9]*[0-9]")))
    return done[-1] if done else None


def save_model_atomic(policy, folder):
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Drop log lines past the resumed step, so metrics.jsonl matches an uninterrupted run."""
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------- the two losses
def sft_loss(policy, samples):
    """Token-mean negative log-likelihood of the GT answer (in the model's frame)."""
    batch = policy.encode([s.image() for s in samples], [s.query for s in samples])
    answers = [answer_text(from_image_frame(s.box, policy.coord, s.image_size, in_size), policy.template)
               for s, in_size in zip(samples, policy.input_sizes(batch))]
    tok = policy.processor.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] + [policy.eos_ids[0]] for a in answers]
    T = max(map(len, ids))
    completion = torch.tensor([x + [policy.pad_id] * (T - len(x)) for x in ids], device=policy.device)
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in ids], device=policy.device)
    logp = policy.completion_logps(batch, completion)
    return -(logp * mask).sum() / mask.sum()


def grpo_step(cfg, policy, ref, samples, tau):
    """Rollout, rewards, advantages and the backward pass of one GRPO step; returns the logs."""
    G = cfg.group_size
    rollout = grpo.sample_groups(policy, [s.image() for s in samples], [s.query for s in samples], G,
                                 cfg.temperature, cfg.max_new_tokens)
    per_row = [s for s in samples for _ in range(G)]
    scores = score_completions(rollout.texts, [s.box for s in per_row], [s.image_size for s in per_row],
                               policy.input_sizes(rollout.batch), policy.coord, tau, cfg.reward,
                               policy.template, cfg.w_fmt)
    advantages = grpo.group_advantages(scores["reward"], G, cfg.adv_scale).to(policy.device)
    policy.model.train()
    n = len(per_row)
    chunk = cfg.micro_batch or n
    stats = {"kl": 0.0, "clip_frac": 0.0, "loss": 0.0}
    for start in range(0, n, chunk):
        rows = policy.select_rows(rollout.batch, start, start + chunk)
        ids, mask = rollout.completion_ids[start:start + chunk], rollout.mask[start:start + chunk]
        logp = policy.completion_logps(rows, ids)
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = ref.completion_logps(rows, ids)
        loss, s = grpo.grpo_loss(logp, None, ref_logp, advantages[start:start + chunk], mask,
                                 eps=cfg.eps, eps_high=cfg.eps_high, beta=cfg.beta,
                                 loss_type=cfg.loss_type, max_new_tokens=cfg.max_new_tokens)
        weight = grpo.chunk_weight(cfg.loss_type, mask, rollout.mask)
        (loss * weight).backward()
        for k in ("kl", "clip_frac"):
            stats[k] += s[k] * weight
        stats["loss"] += loss.item() * weight
    hit_tau = 0.5 if tau is None else tau  # Raw-IoU has no tau: report hits at 0.5
    return scores, {
        "reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item(),
        "hit_rate": (scores["iou"] >= hit_tau).float().mean().item(), "iou_mean": scores["iou"].mean().item(),
        "fmt_mean": scores["fmt"].mean().item(),
        "frac_equal_groups": grpo.frac_equal_groups(scores["reward"], G),
        "parse_fail": scores["parse_fail"].mean().item(), "completion_len": rollout.mask.sum(1).mean().item(),
        **stats}


# ----------------------------------------------------------------------------- the loop
def train_loop(cfg, policy, ref, train_set, eval_set, run_dir, start_step=0, optimizer=None, schedule=None):
    """Run steps start_step+1 .. cfg.steps of cfg.algo, logging and checkpointing as it goes."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = schedule or make_run_schedule(cfg)
    log_path = os.path.join(run_dir, "metrics.jsonl")
    if start_step == 0 and os.path.exists(log_path):
        os.remove(log_path)  # left by a run that died before its config was written
    name = "sft" if cfg.algo == "sft" else f"grpo:{cfg.schedule}"
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=name, initial=start_step,
               total=cfg.steps, dynamic_ncols=True)
    recent_hits = []
    for step in bar:
        t0 = time.time()
        rows = prompt_indices(step - 1, cfg.batch_prompts, len(train_set), cfg.seed)
        samples = [train_set[i] for i in rows]
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step}
        if cfg.algo == "sft":
            policy.model.train()
            loss = sft_loss(policy, samples)
            loss.backward()
            record["loss"] = loss.item()
        else:
            record["tau"] = schedule.tau  # the threshold this step's rewards used
            scores, logs = grpo_step(cfg, policy, ref, samples, schedule.tau)
            record.update(logs)
        record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        optimizer.step()
        if cfg.algo == "grpo":
            record["tau_changed"] = schedule.update(scores["iou"])
            recent_hits = (recent_hits + [record["hit_rate"]])[-20:]
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", tau=schedule.tau,
                            hit=f"{sum(recent_hits) / len(recent_hits):.2f}")
        else:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        record["step_seconds"] = time.time() - t0
        if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics, _ = evaluate(policy, eval_set, max_new_tokens=cfg.max_new_tokens)
            record.update({f"eval_{k}": metrics[k] for k in ("A@0.5", "A@0.8", "mAP", "mIoU")})
        log_line(log_path, record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(run_dir, step, policy, optimizer, schedule, cfg.keep_checkpoints)
    return schedule


def warm_start(cfg, policy, train_set, eval_set, run_dir):
    """Short SFT so the random tiny model can ground at all; saved (and scored) in <run>/warmstart."""
    sft = dataclasses.replace(cfg, algo="sft", steps=cfg.sft_steps, lr=cfg.sft_lr,
                              batch_prompts=cfg.sft_batch, save_every=10 ** 9, schedule="fixed", eval_every=0)
    folder = os.path.join(run_dir, "warmstart")
    os.makedirs(folder, exist_ok=True)
    train_loop(sft, policy, None, train_set, None, folder)
    for ck in glob.glob(os.path.join(folder, "checkpoint-*")):
        shutil.rmtree(ck)  # the model folder below is what later stages use
    save_model_atomic(policy, os.path.join(folder, "model"))
    if eval_set:  # the baseline that GRPO has to beat
        report(policy, eval_set, cfg.max_new_tokens, os.path.join(folder, "eval.json"), "warm start")
    return os.path.join(folder, "model")


def report(policy, eval_set, max_new_tokens, path, title):
    """Evaluate, write the metrics JSON and print the table."""
    metrics, _ = evaluate(policy, eval_set, max_new_tokens=max_new_tokens)
    write_json(metrics, path)
    print(f"\n{title}: {len(eval_set)} test samples")
    print(format_table(metrics))


def load_policy(cfg, name, device):
    try:
        return load_vlm(name, device, cfg.precision, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                        gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision,
                        template=cfg.template, seed=cfg.seed)
    except ValueError as e:  # a missing model or an unsupported family, named
        raise SystemExit(f"error: {e}")


def load_config(given):
    """A new run's Config from the flags; a resumed run's from its config.json."""
    if "resume" not in given:
        return Config(**given)
    path = os.path.join(given["resume"], "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume {given['resume']}: no config.json there (not a run folder)")
    with open(path) as f:
        saved = json.load(f)
    # a resumed run keeps its settings; only the step target and the machine may change
    saved.update({k: v for k, v in given.items() if k in ("steps", "resume", "device", "threads")})
    return Config(**saved)


def load_data(cfg):
    """(train set, eval set or None, eval spec); bad data ends the run with the loader's message."""
    try:
        # the synthetic benchmark is one fixed draw: --seed varies training, not the data
        train_set = load_dataset(cfg.dataset, "train", cfg.image_root, cfg.skip_invalid)
        spec = default_eval_spec(cfg)
        eval_set = None if spec == "none" else load_dataset(spec, "test", cfg.image_root,
                                                             cfg.skip_invalid, cfg.eval_n)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    return train_set, eval_set, spec


def start(cfg, run_dir, device, train_set, eval_set):
    """A new run's policy (after the tiny model's warm start) and its frozen reference."""
    policy = load_policy(cfg, cfg.init or cfg.model, device)
    resolve(cfg, policy)
    if cfg.sft_steps and cfg.algo == "grpo":
        print(f"warm start: {cfg.sft_steps} SFT steps (batch {cfg.sft_batch}, lr {cfg.sft_lr})")
        cfg.init = warm_start(cfg, policy, train_set, eval_set, run_dir)
    write_json(dataclasses.asdict(cfg), os.path.join(run_dir, "config.json"))
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:
        ref_name = cfg.ref_model or cfg.init or cfg.model
        same = ref_name == (cfg.init or cfg.model)
        ref = (policy if same else load_policy(cfg, ref_name, device)).frozen_copy()
    return policy, ref


def resume(cfg, run_dir, device):
    """Policy, reference, optimizer, schedule and step of the latest checkpoint; RNG restored."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"error: --resume {run_dir}: no finished checkpoint to resume from")
    policy = load_policy(cfg, os.path.join(ckpt, "model"), device)
    resolve(cfg, policy)
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:  # the starting policy, recorded in config.json
        ref = load_policy(cfg, cfg.ref_model or cfg.init or cfg.model, device).frozen_copy()
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer.load_state_dict(state["optimizer"])
    schedule = make_run_schedule(cfg)
    schedule.load_state_dict(state["schedule"])
    set_rng_state(state["rng"])
    truncate_log(os.path.join(run_dir, "metrics.jsonl"), state["step"])
    print(f"resumed {run_dir} at step {state['step']} (tau {schedule.tau})")
    return policy, ref, optimizer, schedule, state["step"]


def main(argv=None):
    cfg = load_config(parse_args(argv))
    check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    run_dir = cfg.resume or cfg.out or os.path.join(
        "runs", f"{cfg.algo if cfg.algo == 'sft' else cfg.schedule}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume and os.path.exists(os.path.join(run_dir, "config.json")):
        raise SystemExit(f"error: {run_dir} already holds a run; use --resume {run_dir} or another --out")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_set, eval_set, eval_spec = load_data(cfg)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.resume:
        policy, ref, optimizer, schedule, start_step = resume(cfg, run_dir, device)
    else:
        policy, ref = start(cfg, run_dir, device, train_set, eval_set)
        optimizer, schedule, start_step = None, None, 0

    train_loop(cfg, policy, ref, train_set, eval_set, run_dir, start_step, optimizer, schedule)
    save_model_atomic(policy, os.path.join(run_dir, "final"))
    if eval_set:
        method = f"GRPO, {cfg.schedule} schedule" if cfg.algo == "grpo" else "SFT"
        report(policy, eval_set, cfg.max_new_tokens, os.path.join(run_dir, "eval.json"),
               f"{method}: {run_dir}/final on {eval_spec}")
    return run_dir


if __name__ == "__main__":
    main(sys.argv[1:])
