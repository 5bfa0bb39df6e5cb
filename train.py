"""MedLoc-R1 and VRFT-Aug: GRPO fine-tuning of a VLM, with a curriculum on the IoU threshold tau.

    python train.py                                   # tiny Qwen2.5-VL + synthetic data, whole method
    python train.py --dataset train.jsonl --model Qwen/Qwen2.5-VL-3B-Instruct --gradient-checkpointing
    python train.py --schedule fixed --tau 0.5        # a baseline; see --help for every knob
    torchrun --nproc_per_node 4 train.py --model ... # data parallel: B/4 groups per process

One GRPO step (METHOD.md section 5), `grpo_step` below: B prompts -> G completions each ->
rewards under the schedule's tau -> group advantages -> log-probs -> clipped surrogate + KL ->
AdamW -> schedule update. The task (tasks.py) says what a prompt, an answer and a reward are;
start.py sets the run up; under torchrun every rank runs the same step on its own groups (dist.py).
"""
import dataclasses
import os
import random
import shutil
import sys
import time

import config
if __name__ == "__main__":
    config.refuse_early(sys.argv[1:])  # a flag or path mistake is said before torch loads, in a second
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch allocates:
# gradient checkpointing otherwise fragments CUDA memory into out-of-memory errors on long runs
import numpy as np
import torch
from tqdm import tqdm

import dist
import grpo
import lora
import rundir
import sampling
import start
import trackers
from data import DataError, prompt_indices
from eval import evaluate
from files import RunError, write_json
from model import VLM, reuse_freed_memory
from rundir import Diverged, Stopped, check_finite, timed


# ----------------------------------------------------------------------------- one GRPO step
def grpo_step(run, train_set, samples, step, phases):
    """One GRPO step (METHOD.md section 5) on this rank's prompts; returns the step's log record."""
    cfg, task, policy, G = run.cfg, run.task, run.policy, run.cfg.group_size
    tau = run.schedule.tau if task.has_tau else None  # the threshold this step's rewards use
    # 1-2. G completions per prompt (5.1) and their rewards (section 4 or 10); DAPO's rounds (5.8)
    got = sampling.collect(run, train_set, samples, step, tau, phases)
    if got.rollout is None:  # every group's rewards all equal, every round: nothing to learn from
        print(f"step {step}: no informative group in {got.stats['resample_rounds'] + 1} rounds; no update")
        update = {}
    else:  # 3-5. advantages within each group (5.2), log-probs, loss, AdamW
        advantages = grpo.group_advantages(got.scores["reward"], G, cfg.adv_scale).to(policy.device)  # (N,)
        update = policy_update(run, got.rollout, advantages, phases)
    scores, sampled = {k: dist.gather(v) for k, v in got.seen.items()}, got.sampled  # every rank's, in rank order
    record = {"reward_mean": scores["reward"].mean().item(), "reward_std": scores["reward"].std().item(),
              **task.step_stats(scores, tau), "fmt_mean": scores["fmt"].mean().item(),
              "frac_equal_groups": grpo.frac_equal_groups(scores["reward"], G),
              "group_reward_std": grpo.mean_group_std(scores["reward"], G),
              "parse_fail": scores["parse_fail"].mean().item(),
              "completion_len": dist.gather(sampled.mask.sum(1).cpu()).mean().item(),
              "completion_tokens": int(dist.total(sampled.mask.sum().item())),
              "entropy": dist.total((sampled.entropy * sampled.mask).sum().item()) / dist.total(sampled.mask.sum().item()),
              **got.stats, **update}
    if task.has_tau:  # 6. the curriculum sees every sampled group of every rank: one tau everywhere (section 6)
        record = {"tau": tau, **record, "tau_changed": run.schedule.update(scores["iou"], scores.get("hit")),
                  **getattr(run.schedule, "seen", {})}  # MedLoc-R1's window statistics
        dist.check_same(run.schedule.tau, "tau")
    return record


def policy_update(run, rollout, advantages, phases):
    """Reference log-probs, then mu clipped updates on one rollout (METHOD.md 5.3-5.5).

    Token weights are those of the whole step's (all ranks') loss, so the gradients that
    micro-batches and ranks add up are those of one process on all prompts at once."""
    cfg, policy = run.cfg, run.policy
    rank_share = share(cfg, rollout.mask)
    weights = grpo.token_weights(rollout.mask, cfg.loss_type, cfg.max_new_tokens) * rank_share
    parts = micro_batches(cfg, rollout, advantages, weights)
    with timed(phases, "reference"), torch.no_grad():
        ref_logps = [None if run.ref is None else run.ref.completion_logps(rows, ids, cfg.temperature, mask)
                     for rows, ids, mask, _, _ in parts]
    policy.model.train()
    loss_args = dict(eps=cfg.eps, eps_high=cfg.eps_high, beta=cfg.beta, loss_type=cfg.loss_type)
    old_logps, stats = [None] * len(parts), {"kl": 0.0, "clip_frac": 0.0, "ratio": 0.0, "loss": 0.0}
    for _ in range(cfg.updates_per_rollout):
        logps, seqs = [], []
        for k, (rows, ids, mask, adv, w) in enumerate(parts):
            with timed(phases, "policy_forward"):  # the output layer takes the loss's gradient here
                seq = (grpo.sequence_ratios(policy, rows, ids, mask, old_logps[k], cfg.temperature)
                       if cfg.ratio == "sequence" else None)  # GSPO's s_i (5.9)
                objective = grpo.objective(old_logps[k], ref_logps[k], adv, w, mask, seq, **loss_args)
                loss, logp = policy.completion_loss(rows, ids, objective, cfg.temperature, mask)  # (n, T)
            with timed(phases, "backward"):
                loss.backward()
            stats["loss"] += check_finite("the loss", loss.item()) / cfg.updates_per_rollout
            logps, seqs = logps + [logp], seqs + [seq]
        if old_logps[0] is None:  # pi_old: the policy that sampled, scored by the first update's forward
            old_logps = logps
        update = grpo.loss_stats(torch.cat(logps), torch.cat(old_logps), None if run.ref is None else
                                 torch.cat(ref_logps), advantages, rollout.mask, cfg.eps, cfg.eps_high,
                                 None if seq is None else torch.cat(seqs))
        for key in ("kl", "clip_frac", "ratio"):  # averaged over the mu updates, each rank by its share
            stats[key] += update[key] * rank_share / cfg.updates_per_rollout
        with timed(phases, "optimizer"):
            stats["grad_norm"] = apply_update(run)
    for key in ("kl", "clip_frac", "ratio", "loss"):  # each rank's part is already weighted globally
        stats[key] = dist.total(stats[key])
    m = rollout.mask.bool()  # how far the sampler's numbers are from the scored ones
    gap = (rollout.logps[m] - torch.cat(old_logps)[m]).abs().max()
    stats["sampler_logp_gap"] = dist.gather(gap.reshape(1).cpu()).max().item()
    return stats


def share(cfg, mask):
    """This rank's part of the whole step: its tokens (a token mean: bnpo, cispo) or its sequences."""
    local = mask.sum().item() if cfg.loss_type in ("bnpo", "cispo") else mask.shape[0]
    return local / dist.total(local)


def micro_batches(cfg, rollout, advantages, weights):
    """(prompt rows, completion ids, mask, advantages, token weights) per micro-batch of whole groups."""
    G, n = cfg.group_size, rollout.completion_ids.shape[0]
    chunk = cfg.micro_batch or n
    return [(VLM.select_rows(rollout.batch, s // G, (s + chunk) // G), rollout.completion_ids[s:s + chunk],
             rollout.mask[s:s + chunk], advantages[s:s + chunk], weights[s:s + chunk]) for s in range(0, n, chunk)]


def apply_update(run):
    """Clip the gradient and take one AdamW step; returns the gradient norm before clipping.

    The norm that clipping needs is the finiteness check: a non-finite gradient stops the run
    before the step. No second pass over the weights after it: from finite weights, moments and a
    gradient clipped to a finite norm, AdamW's step (an average over a root of an average, times lr)
    is finite, and checkpoints refuse non-finite weights anyway (rundir.save_checkpoint)."""
    dist.sum_gradients(run.params)  # every rank now holds the whole step's gradient (or its shard of it)
    grad_norm = check_finite("the gradient norm", dist.clip_gradients(run.params, run.cfg.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free until the next backward
    return grad_norm


def sft_loss(run, samples):
    """Token-mean negative log-likelihood of the task's ideal answers (the SFT baseline, the warm start)."""
    policy = run.policy
    batch = policy.encode([s.image() for s in samples], [run.task.prompt(s) for s in samples])
    answers = [run.task.sft_answer(s, i, size) for i, (s, size) in enumerate(zip(samples, policy.input_sizes(batch)))]
    tok = policy.processor.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] + [policy.eos_ids[0]] for a in answers]
    T = max(map(len, ids))
    completion = torch.tensor([x + [policy.pad_id] * (T - len(x)) for x in ids], device=policy.device)
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in ids], device=policy.device)
    tokens = dist.total(mask.sum().item())  # token mean over every rank's batch
    # the usual cross-entropy: the model's plain softmax, not the sampling distribution
    loss, _ = policy.completion_loss(batch, completion, lambda logp, start, stop: -logp / tokens, mask=mask,
                                     sampling=False)
    return loss


# ----------------------------------------------------------------------------- the loop
def train_step(run, train_set, step):
    """One optimizer step of SFT, or one GRPO step (mu updates and the schedule update); the log record."""
    t0, cfg = time.time(), run.cfg
    rows = prompt_indices(step - 1, cfg.batch_prompts, len(train_set), cfg.seed)
    per_rank = len(rows) // dist.world()  # this rank's whole groups; all ranks together take `rows`
    samples = [train_set[i] for i in rows[dist.rank() * per_rank:(dist.rank() + 1) * per_rank]]
    record, phases = {"step": step}, {}
    if cfg.algo == "sft":
        run.policy.model.train()
        loss = sft_loss(run, samples)
        record["loss"] = check_finite("the loss", dist.total(loss.item()))
        loss.backward()
        record["grad_norm"] = apply_update(run)
    else:
        record.update(grpo_step(run, train_set, samples, step, phases))
    record.update({f"seconds_{k}": v for k, v in phases.items()})
    record["step_seconds"] = time.time() - t0
    return record


def train_loop(run, train_set, eval_set, run_dir, start_step=0, tracker=None):
    """Run steps start_step+1 .. cfg.steps, logging (metrics.jsonl, the trackers) and checkpointing as it goes."""
    cfg, policy = run.cfg, run.policy
    log_path = os.path.join(run_dir, "metrics.jsonl")
    if start_step == 0 and dist.is_main() and os.path.exists(log_path):
        os.remove(log_path)  # left by a run that died before its first checkpoint
    name = "sft" if cfg.algo == "sft" else f"grpo:{cfg.schedule}" if run.task.has_tau else "grpo"
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=name, initial=start_step,
               total=cfg.steps, dynamic_ncols=True, disable=not dist.is_main())
    recent, step = [], start_step
    try:
        for step in bar:
            record = train_step(run, train_set, step)
            if cfg.algo == "grpo":  # the task's running hit rate (IoU >= tau) or accuracy
                key, label = run.task.progress
                recent = (recent + [record[key]])[-20:]
                tau = {"tau": record["tau"]} if "tau" in record else {}
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}", **tau, **{label: f"{sum(recent) / len(recent):.2f}"})
            else:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if eval_set and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and evaluates_here(policy):
                metrics, _ = evaluate(policy, run.task, eval_set, max_new_tokens=cfg.max_new_tokens)
                record.update({f"eval_{k}": metrics[k] for k in ("A@0.5", "A@0.8", "mAP", "mIoU", "accuracy",
                                                                  "macro_f1", "qwk") if k in metrics})
            if dist.is_main():
                rundir.log_line(log_path, record)
            if tracker and cfg.report_to != "none":  # every rank: sampling may need them all
                tracker_step(run, tracker, record, eval_set or train_set)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(run, run_dir, step)
            if dist.is_main() and ("eval_mIoU" in record or "eval_accuracy" in record or step % cfg.save_every == 0
                                   or step == cfg.steps):
                rundir.plot_curves(run_dir, cfg.margin if cfg.schedule == "medloc" else None)  # the run's picture
    except KeyboardInterrupt:
        raise Stopped(step - 1)
    except Diverged as e:
        last = rundir.checkpoints(run_dir)
        raise RunError(f"step {step}: {e} (lr {cfg.lr}); stopped before saving anything of this step; "
                       f"last checkpoint: {os.path.basename(last[-1]) if last else 'none'}")


def tracker_step(run, tracker, record, shown):
    """The step's record to the trackers (rank 0's); every --log-samples-every steps, two completions
    of each of the first two samples, drawn by every rank (a sharded model samples together)."""
    every = run.cfg.log_samples_every
    if every and record["step"] % every == 0:
        items = sampled_completions(run, shown[:2])
        tracker.log_samples(record["step"], items)
    tracker.log(record)


def sampled_completions(run, samples, k=2):
    """k completions per sample from the policy as it is, with their reward and prediction (box, IoU);
    the random state is put back after, so a run reports what it would have done unwatched."""
    policy, task, cfg = run.policy, run.task, run.cfg
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []), \
            torch.no_grad(), dist.gathered(policy.model):
        out = grpo.sample_groups(policy, [s.image() for s in samples], [task.prompt(s) for s in samples], k,
                                 cfg.temperature, cfg.max_new_tokens, finished=dist.all_done)
    rows, sizes = [s for s in samples for _ in range(k)], [z for z in policy.input_sizes(out.batch) for _ in range(k)]
    rewards = task.rewards(out.texts, rows, sizes, run.schedule.tau if task.has_tau else None)["reward"]
    return [{"sample": s, "reward": r.item(), **task.predict(text, s, z)}
            for s, text, z, r in zip(rows, out.texts, sizes, rewards)]


def save_checkpoint(run, run_dir, step):
    rngs = dist.gather_objects(rundir.rng_state())  # every rank's, to resume exactly
    if run.cfg.checkpoint == "sharded":  # each rank writes its own shards: no process holds the whole state
        rundir.save_sharded_checkpoint(run_dir, step, run, rngs)
    else:  # gathered to rank 0 one tensor at a time, written as a model folder
        weights, optimizer_state = dist.full_state(run.policy.model), dist.full_optimizer_state(run.optimizer)
        if dist.is_main():
            rundir.save_checkpoint(run_dir, step, run.policy, optimizer_state, run.schedule,
                                   run.cfg.keep_checkpoints, rngs, weights)
        dist.barrier()


def warm_start(cfg, task, policy, train_set, eval_set, run_dir):
    """Short SFT so the random tiny model can ground at all; saved (and scored) in <run>/warmstart."""
    sft = dataclasses.replace(cfg, algo="sft", steps=cfg.sft_steps, lr=cfg.sft_lr,
                              batch_prompts=cfg.sft_batch, save_every=10 ** 9, schedule="fixed", eval_every=0)
    folder = os.path.join(run_dir, "warmstart")
    os.makedirs(folder, exist_ok=True)
    train_loop(start.Run(sft, task, policy, None, *start.optimizer_of(sft, policy), start.make_run_schedule(sft)),
               train_set, None, folder)
    weights = dist.full_state(policy.model)
    if dist.is_main():
        for ck in rundir.checkpoints(folder):
            shutil.rmtree(ck)  # the model folder below is what later stages use
        rundir.save_model(policy, os.path.join(folder, "model"), weights)
    if eval_set and evaluates_here(policy):  # the baseline that GRPO has to beat
        report(policy, task, eval_set, cfg.max_new_tokens, os.path.join(folder, "eval.json"), "warm start")
    dist.barrier()
    return os.path.join(folder, "model")


def score_start(cfg, task, policy, eval_set, run_dir):
    """The model this run starts from (--init, or the shipped tiny warm start), scored in
    <run>/warmstart/eval.json: the baseline the run has to beat."""
    if evaluates_here(policy):
        report(policy, task, eval_set, cfg.max_new_tokens, os.path.join(run_dir, "warmstart", "eval.json"),
               f"start ({cfg.init})")
    dist.barrier()


def evaluates_here(policy):
    """Evaluation runs on rank 0 alone, unless the model is split over the ranks: then each
    forward needs them all, so every rank evaluates the same samples (rank 0 reports)."""
    return dist.is_main() or dist.is_sharded(policy.model)


def report(policy, task, eval_set, max_new_tokens, path, title):
    """Evaluate; rank 0 writes the metrics JSON (and the task's plots) and prints the table."""
    metrics, _ = evaluate(policy, task, eval_set, max_new_tokens=max_new_tokens)
    if dist.is_main():
        write_json(metrics, path)
        task.save_plots(metrics, os.path.splitext(path)[0])
        print(f"\n{title}: {len(eval_set)} test samples")
        print(task.table(metrics))
    return metrics


# ----------------------------------------------------------------------------- a whole run
def train(cfg, run_dir, device):
    """Load the data, start or resume, train, save final/ and evaluate."""
    family = start.check_models(cfg)
    train_set, eval_set, eval_spec, labels = start.load_data(cfg)
    start.banner(cfg, family, device, train_set, eval_set, eval_spec, run_dir)
    if cfg.resume and rundir.checkpoints(run_dir):
        run, step = start.resume(cfg, run_dir, device, labels)
    else:
        if cfg.resume:  # stopped before its first checkpoint: the same run from the start
            print(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its settings")
        policy, task = start.new_policy(cfg, device, labels)
        warmed = os.path.join(run_dir, "warmstart", "model")
        if cfg.sft_steps and cfg.algo == "grpo" and cfg.init != warmed:
            print(f"warm start: {cfg.sft_steps} SFT steps (batch {cfg.sft_batch}, lr {cfg.sft_lr})")
            cfg.init = warm_start(cfg, task, policy, train_set, eval_set, run_dir)
        elif cfg.init and eval_set and not os.path.exists(os.path.join(run_dir, "warmstart", "eval.json")):
            score_start(cfg, task, policy, eval_set, run_dir)
        run, step = start.begin(cfg, run_dir, device, policy, task), 0
    names = trackers.parse_report_to(cfg.report_to) if dist.is_main() else []
    tracker = trackers.Trackers(names, run_dir, step, dataclasses.asdict(cfg), cfg.run_group)
    train_loop(run, train_set, eval_set, run_dir, step, tracker)
    policy = run.policy
    lora.merge(policy.model)  # final/ is a plain model that transformers loads alone
    rundir.save_final(policy, os.path.join(run_dir, "final"), cfg)
    if eval_set and evaluates_here(policy):
        method = "SFT" if cfg.algo == "sft" else f"GRPO, {cfg.schedule} schedule" if run.task.has_tau else "GRPO"
        metrics = report(policy, run.task, eval_set, cfg.max_new_tokens, os.path.join(run_dir, "eval.json"),
                         f"{method}: {run_dir}/final on {eval_spec}")
        tracker.log_eval(metrics, cfg.steps)
    tracker.close()
    dist.barrier()
    rundir.say_written(run_dir)


def main(argv=None):
    """The command line. A user's mistake ends in one line naming it, never a traceback."""
    run_dir = None
    try:
        cfg, device = start.configure(argv)  # every rank checks the flags; under torchrun they agree
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        reuse_freed_memory()  # the scoring passes' logit chunks, reused instead of mapped afresh
        run_dir = cfg.resume or cfg.out or os.path.join(
            "runs", f"{cfg.algo if cfg.algo == 'sft' else cfg.schedule}-{time.strftime('%Y%m%d-%H%M%S')}")
        with rundir.claim(run_dir, cfg.resume):
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            train(cfg, run_dir, device)
        dist.teardown()
    except (RunError, DataError) as e:
        dist.teardown(together=False)
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
    except Exception as e:
        if not dist.lost_peer(e):
            raise
        last = rundir.checkpoints(run_dir) if run_dir else []  # another process died: this one cannot go on alone
        message = dist.lost_peer_message(e, run_dir, last)
        dist.teardown(together=False)
        raise SystemExit(message)
    return run_dir


if __name__ == "__main__":
    main(sys.argv[1:])
