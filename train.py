"""MedLoc-R1: GRPO fine-tuning of a VLM for visual grounding with a curriculum on the IoU threshold.

    python train.py                                   # tiny Qwen2.5-VL + synthetic data, whole method
    python train.py --dataset train.jsonl --model Qwen/Qwen2.5-VL-3B-Instruct --gradient-checkpointing
    python train.py --schedule fixed --tau 0.5        # a baseline; see --help for every knob
    torchrun --nproc_per_node 4 train.py --model ... # data parallel: B/4 groups per process

One step (METHOD.md section 5): B prompts -> G completions each -> rewards under the schedule's tau
-> group advantages -> clipped surrogate + KL -> AdamW -> schedule update -> log.
"""
import contextlib
import dataclasses
import functools
import math
import os
import random
import shutil
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch allocates:
# gradient checkpointing otherwise fragments CUDA memory into out-of-memory errors on long runs
import numpy as np
import torch
from tqdm import tqdm

import dist
import grpo
import lora
import rundir
from config import PATH_KEYS, check, load_config, parse_args, parse_stages
from data import DataError, load_class_dataset, load_dataset, with_knowledge
from eval import evaluate, format_table, save_confusion, write_json
from model import SFT_REASONING, VLM, answer_text, class_answer, default_max_new_tokens, load_vlm
from reward import from_image_frame, score_classes, score_completions
from rundir import RunError
from scheduler import make_schedule


# ----------------------------------------------------------------------------- set-up
def resolve(cfg, vlm):
    """Fill the defaults that depend on the model (tiny vs pretrained)."""
    tiny_fresh = vlm.is_tiny and cfg.init is None and cfg.model == "tiny"
    if cfg.lr is None:
        cfg.lr = 1e-4 if vlm.is_tiny else 1e-6
        if cfg.lora_rank:  # LoRA moves a few parameters: its usual rate is 10x that of full fine-tuning
            cfg.lr = round(cfg.lr * 10, 12)
    cfg.max_new_tokens = cfg.max_new_tokens or default_max_new_tokens(vlm)
    if cfg.sft_steps is None:
        cfg.sft_steps = 1200 if tiny_fresh and cfg.algo == "grpo" else 0
    cfg.reward = cfg.reward or ("iou" if cfg.schedule == "raw-iou" else "threshold")


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


# ----------------------------------------------------------------------------- the two losses
def sft_reasoning(policy, label, i):
    """The SFT target's reasoning for the i-th sample of a batch: with the knowledge in the prompt
    (PA_p, METHOD.md 10) every other one recites the true class's description. A pretrained VLM
    quotes its prompt some of the time; the tiny one must be shown, so that R_recite of either
    sign has two behaviours of the warm-started policy to choose between."""
    description = policy.labels.descriptions[label]
    return f"{description}." if policy.knowledge and description and i % 2 else SFT_REASONING


def sft_loss(policy, samples):
    """Token-mean negative log-likelihood of the GT answer (a box in the model's frame, or a class)."""
    batch = policy.encode([s.image() for s in samples], [policy.query_of(s) for s in samples])
    if policy.task == "classify":
        answers = [class_answer(policy.labels.names[s.label], policy.template, sft_reasoning(policy, s.label, i))
                   for i, s in enumerate(samples)]
    else:
        answers = [answer_text(from_image_frame(s.box, policy.coord, s.image_size, in_size), policy.template)
                   for s, in_size in zip(samples, policy.input_sizes(batch))]
    tok = policy.processor.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] + [policy.eos_ids[0]] for a in answers]
    T = max(map(len, ids))
    completion = torch.tensor([x + [policy.pad_id] * (T - len(x)) for x in ids], device=policy.device)
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in ids], device=policy.device)
    # the usual cross-entropy: the model's plain softmax, not the sampling distribution
    logp = policy.completion_logps(batch, completion, mask=mask, sampling=False)
    return -(logp * mask).sum() / dist.total(mask.sum().item())  # token mean over every rank's batch


@contextlib.contextmanager
def timed(phases, name):
    """Add the wall time of the block to phases[name] (CUDA work is waited for, so it counts)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


def sample(cfg, policy, samples):
    """The step's rollout: by hand with shared prompts, or transformers' generate on G copies."""
    images, queries = [s.image() for s in samples], [policy.query_of(s) for s in samples]
    if not cfg.naive_step:
        return grpo.sample_groups(policy, images, queries, cfg.group_size, cfg.temperature, cfg.max_new_tokens,
                                  together=True)
    batch = policy.encode(images, queries)
    ids = policy.generate_repeated(batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature)
    return grpo.Rollout(batch, ids, grpo.completion_mask(ids, policy.eos_ids), policy.decode(ids))


def score(cfg, vlm, rows, ids, mask):
    """log pi of the completions of one micro-batch (METHOD.md 5.3), at the rollout temperature."""
    if cfg.naive_step:
        return vlm.completion_logps_repeated(rows, ids, cfg.temperature)
    return vlm.completion_logps(rows, ids, cfg.temperature, mask)


def micro_batches(cfg, rollout, advantages):
    """(prompt rows, completion ids, mask, advantages) per micro-batch of whole groups."""
    G, n = cfg.group_size, rollout.completion_ids.shape[0]
    chunk = cfg.micro_batch or n
    return [(VLM.select_rows(rollout.batch, s // G, (s + chunk) // G), rollout.completion_ids[s:s + chunk],
             rollout.mask[s:s + chunk], advantages[s:s + chunk]) for s in range(0, n, chunk)]


def grpo_step(cfg, policy, ref, optimizer, params, samples, tau, phases):
    """One GRPO step (METHOD.md section 5) on this rank's prompts: rollout, rewards, advantages,
    then the policy update. Returns the scores of every rank's completions and the step's logs."""
    G = cfg.group_size
    with timed(phases, "rollout"):
        rollout = sample(cfg, policy, samples)
    with timed(phases, "reward"):
        scores = rewards(cfg, policy, rollout, samples, tau)
        advantages = grpo.group_advantages(scores["reward"], G, cfg.adv_scale).to(policy.device)
    stats = policy_update(cfg, policy, ref, optimizer, params, rollout, advantages, phases)
    scores = {k: dist.gather(v) for k, v in scores.items()}  # every rank's groups, in rank order
    if cfg.task == "classify":
        task_stats = {f"{k}_mean": scores[k].mean().item() for k in ("acc", "mfrs", "recite")}
    else:
        hit_tau = 0.5 if tau is None else tau  # Raw-IoU has no tau: report hits at 0.5
        task_stats = {"hit_rate": (scores["iou"] >= hit_tau).float().mean().item(),
                      "iou_mean": scores["iou"].mean().item()}
    return scores, {
        "reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item(),
        **task_stats, "fmt_mean": scores["fmt"].mean().item(),
        "frac_equal_groups": grpo.frac_equal_groups(scores["reward"], G),
        "parse_fail": scores["parse_fail"].mean().item(),
        "completion_len": dist.gather(rollout.mask.sum(1).cpu()).mean().item(),
        "completion_tokens": int(dist.total(rollout.mask.sum().item())), **stats}


def rewards(cfg, policy, rollout, samples, tau):
    """Reward columns of the rollout's completions: grounding (METHOD.md 4) or classification (10)."""
    per_row = [s for s in samples for _ in range(cfg.group_size)]
    if cfg.task == "classify":
        return score_classes(rollout.texts, [s.label for s in per_row], policy.labels.names, policy.template,
                             cfg.w_fmt, cfg.mfrs_weight, cfg.mfrs_decay, cfg.recite_weight, policy.known_text())
    in_sizes = [size for size in policy.input_sizes(rollout.batch) for _ in range(cfg.group_size)]
    return score_completions(rollout.texts, [s.box for s in per_row], [s.image_size for s in per_row],
                             in_sizes, policy.coord, tau, cfg.reward, policy.template, cfg.w_fmt)


def policy_update(cfg, policy, ref, optimizer, params, rollout, advantages, phases):
    """Reference log-probs, then mu clipped updates on one rollout (METHOD.md 5.3-5.5).

    Each micro-batch's loss is weighted by its share of the whole step's (all ranks') sequences
    or tokens, so the gradients summed over ranks are those of one process on all prompts."""
    parts = micro_batches(cfg, rollout, advantages)
    with timed(phases, "reference"), torch.no_grad():
        ref_logps = [None if ref is None else score(cfg, ref, *part[:3]) for part in parts]
    policy.model.train()
    local = rollout.mask.sum().item() if cfg.loss_type == "bnpo" else rollout.mask.shape[0]
    share = local / dist.total(local)  # this rank's part of the global loss
    old_logps = [None] * len(parts)
    stats = {"kl": 0.0, "clip_frac": 0.0, "ratio": 0.0, "loss": 0.0}
    for update in range(cfg.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        for k, (rows, ids, mask, adv) in enumerate(parts):
            with timed(phases, "policy_forward"):
                logp = score(cfg, policy, rows, ids, mask)
                if old_logps[k] is None:  # pi_old: the policy that sampled, scored by this same forward
                    old_logps[k] = logp.detach()
                loss, s = grpo.grpo_loss(logp, old_logps[k], ref_logps[k], adv, mask, eps=cfg.eps,
                                         eps_high=cfg.eps_high, beta=cfg.beta, loss_type=cfg.loss_type,
                                         max_new_tokens=cfg.max_new_tokens)
                weight = grpo.chunk_weight(cfg.loss_type, mask, rollout.mask) * share
            with timed(phases, "backward"):
                (loss * weight).backward()
            for key in ("kl", "clip_frac", "ratio"):  # averaged over the mu updates
                stats[key] += s[key] * weight / cfg.updates_per_rollout
            stats["loss"] += check_finite("the loss", loss.item()) * weight / cfg.updates_per_rollout
        with timed(phases, "optimizer"):
            stats["grad_norm"] = apply_update(cfg, params, optimizer)
    for key in ("kl", "clip_frac", "ratio", "loss"):  # each rank's part is already weighted globally
        stats[key] = dist.total(stats[key])
    if rollout.logps is not None:  # how far the sampler's numbers are from the scored ones
        m = rollout.mask.bool()
        gap = (rollout.logps[m] - torch.cat(old_logps)[m]).abs().max()
        stats["sampler_logp_gap"] = dist.gather(gap.reshape(1).cpu()).max().item()
    return stats


def apply_update(cfg, params, optimizer):
    """Clip the gradient and take one AdamW step; returns the gradient norm before clipping.
    A non-finite gradient stops the run before the step, non-finite weights right after it."""
    dist.sum_gradients(params)  # every rank now holds the whole step's gradient (or its shard of it)
    grad_norm = check_finite("the gradient norm", dist.clip_gradients(params, cfg.grad_clip))
    optimizer.step()
    if not dist.everywhere(rundir.all_finite(params)):
        raise Diverged("the update made the weights non-finite")
    return grad_norm


# ----------------------------------------------------------------------------- the loop
class Diverged(Exception):
    """The loss, the gradient or the weights stopped being finite."""


class Stopped(Exception):
    """Ctrl-C; carries the last finished step."""

    def __init__(self, step):
        self.step = step


def train_loop(cfg, policy, ref, train_set, eval_set, run_dir, start_step=0, optimizer=None, schedule=None):
    """Run steps start_step+1 .. cfg.steps of cfg.algo, logging and checkpointing as it goes."""
    params = dist.trainable(policy.model)
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = schedule or make_run_schedule(cfg)
    log_path = os.path.join(run_dir, "metrics.jsonl")
    if start_step == 0 and os.path.exists(log_path):
        os.remove(log_path)  # left by a run that died before its first checkpoint
    name = "sft" if cfg.algo == "sft" else "grpo" if cfg.task == "classify" else f"grpo:{cfg.schedule}"
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=name, initial=start_step,
               total=cfg.steps, dynamic_ncols=True, disable=not dist.is_main())
    recent_hits, step = [], start_step
    try:
        for step in bar:
            record = train_step(cfg, policy, ref, optimizer, params, schedule, train_set, step)
            if cfg.algo == "grpo" and cfg.task == "classify":
                recent_hits = (recent_hits + [record["acc_mean"]])[-20:]
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{sum(recent_hits) / len(recent_hits):.2f}")
            elif cfg.algo == "grpo":  # hits: IoU >= tau
                recent_hits = (recent_hits + [record["hit_rate"]])[-20:]
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}", tau=record["tau"],
                                hit=f"{sum(recent_hits) / len(recent_hits):.2f}")
            else:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and evaluates_here(policy):
                metrics, _ = evaluate(policy, eval_set, max_new_tokens=cfg.max_new_tokens)
                record.update({f"eval_{k}": metrics[k] for k in ("A@0.5", "A@0.8", "mAP", "mIoU", "accuracy",
                                                                  "macro_f1", "qwk") if k in metrics})
            if dist.is_main():
                rundir.log_line(log_path, record)
            if step % cfg.save_every == 0 or step == cfg.steps:
                rngs = dist.gather_objects(rundir.rng_state())  # every rank's, to resume exactly
                weights, optimizer_state = dist.full_state(policy.model), dist.full_optimizer_state(optimizer)
                if dist.is_main():
                    rundir.save_checkpoint(run_dir, step, policy, optimizer_state, schedule, cfg.keep_checkpoints,
                                           rngs, weights)
                dist.barrier()
    except KeyboardInterrupt:
        raise Stopped(step - 1)
    except Diverged as e:
        last = rundir.checkpoints(run_dir)
        raise RunError(f"step {step}: {e} (lr {cfg.lr}); stopped before saving anything of this step; "
                       f"last checkpoint: {os.path.basename(last[-1]) if last else 'none'}")
    return schedule


def train_step(cfg, policy, ref, optimizer, params, schedule, train_set, step):
    """One optimizer step of SFT, or one GRPO step (mu updates) and the schedule update; the log record."""
    t0 = time.time()
    rows = prompt_indices(step - 1, cfg.batch_prompts, len(train_set), cfg.seed)
    share = len(rows) // dist.world()  # this rank's whole groups; all ranks together take `rows`
    samples = [train_set[i] for i in rows[dist.rank() * share:(dist.rank() + 1) * share]]
    record, phases = {"step": step}, {}
    if cfg.algo == "sft":
        policy.model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = sft_loss(policy, samples)
        record["loss"] = check_finite("the loss", dist.total(loss.item()))
        loss.backward()
        record["grad_norm"] = apply_update(cfg, params, optimizer)
    elif cfg.task == "classify":  # no threshold to schedule
        record.update(grpo_step(cfg, policy, ref, optimizer, params, samples, None, phases)[1])
    else:
        record["tau"] = schedule.tau  # the threshold this step's rewards used
        scores, logs = grpo_step(cfg, policy, ref, optimizer, params, samples, schedule.tau, phases)
        record.update(logs)
        record["tau_changed"] = schedule.update(scores["iou"])  # every rank's IoUs: one curriculum
        record.update(getattr(schedule, "seen", {}))  # MedLoc-R1's window statistics
        dist.check_same(schedule.tau, "tau")
    record.update({f"seconds_{k}": v for k, v in phases.items()})
    record["step_seconds"] = time.time() - t0
    return record


def check_finite(what, value):
    if not math.isfinite(value):
        raise Diverged(f"{what} is {value}")
    return value


def warm_start(cfg, policy, train_set, eval_set, run_dir):
    """Short SFT so the random tiny model can ground at all; saved (and scored) in <run>/warmstart."""
    sft = dataclasses.replace(cfg, algo="sft", steps=cfg.sft_steps, lr=cfg.sft_lr,
                              batch_prompts=cfg.sft_batch, save_every=10 ** 9, schedule="fixed", eval_every=0)
    folder = os.path.join(run_dir, "warmstart")
    os.makedirs(folder, exist_ok=True)
    train_loop(sft, policy, None, train_set, None, folder)
    weights = dist.full_state(policy.model)
    if dist.is_main():
        for ck in rundir.checkpoints(folder):
            shutil.rmtree(ck)  # the model folder below is what later stages use
        rundir.save_model(policy, os.path.join(folder, "model"), weights)
    if eval_set and evaluates_here(policy):  # the baseline that GRPO has to beat
        report(policy, eval_set, cfg.max_new_tokens, os.path.join(folder, "eval.json"), "warm start")
    dist.barrier()
    return os.path.join(folder, "model")


def evaluates_here(policy):
    """Evaluation runs on rank 0 alone, unless the model is split over the ranks: then each
    forward needs them all, so every rank evaluates the same samples (rank 0 reports)."""
    return dist.is_main() or dist.is_sharded(policy.model)


def report(policy, eval_set, max_new_tokens, path, title):
    """Evaluate; rank 0 writes the metrics JSON and prints the table."""
    metrics, _ = evaluate(policy, eval_set, max_new_tokens=max_new_tokens)
    if dist.is_main():
        write_json(metrics, path)
        if policy.task == "classify":
            save_confusion(metrics, os.path.splitext(path)[0] + "_confusion.png")
        print(f"\n{title}: {len(eval_set)} test samples")
        print(format_table(metrics))


# ----------------------------------------------------------------------------- set-up and main
def load_policy(cfg, name, device, labels=None):
    """A policy or reference from `name`, set to this run's task (the labels of a classifier)."""
    try:
        vlm = load_vlm(name, device, cfg.precision, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                       gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision,
                       template=cfg.template, seed=cfg.seed)
    except ValueError as e:  # a missing model or an unsupported family, named
        raise RunError(str(e))
    if cfg.task == "classify":
        vlm.set_task("classify", labels or vlm.labels, bool(cfg.knowledge))
    return vlm


def load_data(cfg):
    """(train set, eval set or None, eval spec, labels or None); bad data ends the run with the
    loader's message. The synthetic benchmark is one fixed draw: --seed varies training, not the data."""
    spec = default_eval_spec(cfg)
    if cfg.task == "classify":
        knowledge_file = cfg.knowledge if isinstance(cfg.knowledge, str) else None
        train_set, labels = load_class_dataset(cfg.dataset, cfg.labels or knowledge_file, "train", cfg.image_root,
                                               cfg.skip_invalid)
        if knowledge_file:
            labels = with_knowledge(labels, knowledge_file)
        eval_set = None if spec == "none" else load_class_dataset(spec, labels, "test", cfg.image_root,
                                                                   cfg.skip_invalid, cfg.eval_n)[0]
        if cfg.mfrs_weight and not labels.ordinal:
            raise DataError(f"--mfrs-weight {cfg.mfrs_weight}: the classes of {cfg.dataset} are not ordinal grades")
        if cfg.knowledge and not any(labels.descriptions):
            raise DataError(f"--knowledge: the labels of {cfg.dataset} have no descriptions to inject")
        return train_set, eval_set, spec, labels
    train_set = load_dataset(cfg.dataset, "train", cfg.image_root, cfg.skip_invalid, box_format=cfg.box_format)
    eval_set = None if spec == "none" else load_dataset(spec, "test", cfg.image_root, cfg.skip_invalid,
                                                         cfg.eval_n, box_format=cfg.box_format)
    return train_set, eval_set, spec, None


def start(cfg, run_dir, device, train_set, eval_set, labels):
    """A new run's policy (after the tiny model's warm start) and its frozen reference."""
    policy = load_policy(cfg, cfg.init or cfg.model, device, labels)
    resolve(cfg, policy)
    if cfg.fsdp:
        dist.shard(policy.model)
    warmed = os.path.join(run_dir, "warmstart", "model")
    if cfg.sft_steps and cfg.algo == "grpo" and cfg.init != warmed:
        print(f"warm start: {cfg.sft_steps} SFT steps (batch {cfg.sft_batch}, lr {cfg.sft_lr})")
        cfg.init = warm_start(cfg, policy, train_set, eval_set, run_dir)
    if cfg.lora_rank:  # after the warm start: the adapters learn the RL update only
        add_adapters(cfg, policy)
    saved = {k: rundir.to_config_path(v, run_dir) if k in PATH_KEYS else v
             for k, v in dataclasses.asdict(cfg).items()}
    if dist.is_main():
        write_json(saved, os.path.join(run_dir, "config.json"))
    if dist.world() > 1:  # ranks draw different completions for their groups
        torch.manual_seed(cfg.seed + dist.rank())
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:
        ref_name = cfg.ref_model or cfg.init or cfg.model
        ref = reference(cfg, policy, ref_name, device, same=ref_name == (cfg.init or cfg.model))
    return policy, ref


def reference(cfg, policy, name, device, same):
    """The frozen KL anchor (METHOD.md 5.3): a frozen copy of `policy` while that is still the
    starting model (`same`), else loaded from `name`. Under --fsdp it is always loaded, then
    sharded like the policy (a sharded model cannot be copied whole)."""
    if cfg.fsdp:
        ref = load_policy(cfg, name, device, policy.labels).freeze()
        dist.shard(ref.model)
        return ref
    return (policy if same else load_policy(cfg, name, device, policy.labels)).frozen_copy()


def add_adapters(cfg, policy, folder=None):
    """LoRA adapters on the policy: fresh ones, or those saved in `folder` (a checkpoint's model/)."""
    policy.base_name = os.path.abspath(cfg.init) if cfg.init else cfg.model
    try:
        if folder:
            lora.load(policy.model, folder)
        else:
            lora.inject(policy.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or lora.DEFAULT_TARGETS,
                        cfg.lora_dropout)
    except ValueError as e:  # a --lora-targets that matches nothing
        raise RunError(str(e))


def resume(cfg, run_dir, device, labels):
    """Policy, reference, optimizer, schedule and step of the newest intact checkpoint; RNG restored."""
    ckpt, state, skipped = rundir.latest_intact(run_dir)
    for reason in skipped:
        print(f"skipping a damaged checkpoint: {reason}")
    if ckpt is None:
        raise RunError(f"--resume {run_dir}: no intact checkpoint to resume from")
    if cfg.steps <= state["step"]:
        raise RunError(f"--resume {run_dir}: the run is at step {state['step']}; pass --steps above that")
    if cfg.lora_rank:  # the checkpoint holds the adapters; the base is the run's starting model
        policy = load_policy(cfg, cfg.init or cfg.model, device, labels)
        add_adapters(cfg, policy, os.path.join(ckpt, "model"))
    else:
        policy = load_policy(cfg, os.path.join(ckpt, "model"), device, labels)
    resolve(cfg, policy)
    if cfg.fsdp:
        dist.shard(policy.model)
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:  # the starting policy, recorded in config.json
        ref = reference(cfg, policy, cfg.ref_model or cfg.init or cfg.model, device,
                        same=cfg.lora_rank and not cfg.ref_model)
    optimizer = torch.optim.AdamW(dist.trainable(policy.model),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    dist.load_optimizer_state(optimizer, state["optimizer"])
    schedule = make_run_schedule(cfg)
    schedule.load_state_dict(state["schedule"])
    rngs = state["rng"]  # one per rank of the run that saved it
    rundir.set_rng_state(rngs[dist.rank() % len(rngs)])
    if dist.rank() >= len(rngs):  # more ranks than before: a stream of its own
        torch.manual_seed(cfg.seed + dist.rank() + state["step"])
    if dist.is_main():
        rundir.truncate_log(os.path.join(run_dir, "metrics.jsonl"), state["step"])
    print(f"resumed {run_dir} at step {state['step']} (tau {schedule.tau})")
    return policy, ref, optimizer, schedule, state["step"]


def run(cfg, run_dir, device):
    """Load the data, start or resume, train, save final/ and evaluate."""
    train_set, eval_set, eval_spec, labels = load_data(cfg)
    if eval_set is None and dist.is_main():
        print(f"no evaluation at the end: {cfg.dataset} has no built-in test split; pass --eval-dataset FILE, "
              f"or run eval.py --model {run_dir}/final --dataset FILE afterwards")
    if cfg.resume and rundir.checkpoints(run_dir):
        policy, ref, optimizer, schedule, start_step = resume(cfg, run_dir, device, labels)
    else:
        if cfg.resume:  # stopped before its first checkpoint: the same run from the start
            print(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its settings")
        policy, ref = start(cfg, run_dir, device, train_set, eval_set, labels)
        optimizer, schedule, start_step = None, None, 0
    train_loop(cfg, policy, ref, train_set, eval_set, run_dir, start_step, optimizer, schedule)
    lora.merge(policy.model)  # final/ is a plain model that transformers loads alone
    weights = dist.full_state(policy.model)
    if dist.is_main():
        rundir.save_model(policy, os.path.join(run_dir, "final"), weights)
    if eval_set and evaluates_here(policy):
        method = "SFT" if cfg.algo == "sft" else "GRPO" if cfg.task == "classify" else f"GRPO, {cfg.schedule} schedule"
        report(policy, eval_set, cfg.max_new_tokens, os.path.join(run_dir, "eval.json"),
               f"{method}: {run_dir}/final on {eval_spec}")
    dist.barrier()


def main(argv=None):
    """The command line. A user's mistake ends in one line naming it, never a traceback."""
    run_dir = None
    try:
        cfg = load_config(parse_args(argv))
        check(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's process count
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        device = dist.setup(device, cfg.fsdp)
        run_dir = cfg.resume or cfg.out or os.path.join(
            "runs", f"{cfg.algo if cfg.algo == 'sft' else cfg.schedule}-{time.strftime('%Y%m%d-%H%M%S')}")
        rundir.prepare(run_dir)
        with rundir.Lock(run_dir) if dist.is_main() else contextlib.nullcontext():
            if not cfg.resume and os.path.exists(os.path.join(run_dir, "config.json")):
                raise RunError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
            if dist.is_main():
                rundir.remove_leftovers(run_dir)
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            run(cfg, run_dir, device)
        dist.teardown()
    except (RunError, DataError) as e:
        raise SystemExit(f"error: {e}")
    except Stopped as s:
        last = rundir.checkpoints(run_dir)
        if not os.path.exists(os.path.join(run_dir, "config.json")):  # Ctrl-C in the warm start
            print(f"\nstopped in the warm start (step {s.step}); nothing to resume: start the run again",
                  file=sys.stderr)
        else:
            print(f"\nstopped at step {s.step}; last checkpoint: {os.path.basename(last[-1]) if last else 'none'}; "
                  f"resume with: python train.py --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130)
    return run_dir


if __name__ == "__main__":
    main(sys.argv[1:])
