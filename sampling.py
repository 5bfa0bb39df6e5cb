"""The step's rollout and rewards (METHOD.md 5.1 and 4), and DAPO's dynamic sampling (5.8).

`collect` draws G completions for each of this rank's prompts and scores them. With
--dynamic-sampling, a group whose G rewards are all equal gives no gradient (its advantages are
0): it is dropped, and more prompts are drawn, round after round, until the rank holds its share
of --batch-prompts informative groups or --max-resample rounds are spent. Every sampled group
stays in `Collected.sampled`: the log and the curriculum's window see the policy, not the filter.
Under torchrun every rank samples in every round (decoding is collective) until no rank is short,
and all keep as many groups as the rank that has fewest, so every rank runs the same forwards.
"""
from dataclasses import dataclass

import torch

import dist
import grpo
from data import resample_indices
from model import VLM
from rundir import timed


@dataclass
class Collected:
    rollout: object   # grpo.Rollout of the groups the update trains on; None when none is informative
    scores: dict      # their reward columns (N,)
    sampled: object   # grpo.Rollout of every group sampled this step (`rollout` itself without dynamic sampling)
    seen: dict        # its reward columns: what the log and the curriculum's window read
    stats: dict       # dynamic sampling: prompts drawn, groups dropped, completions sampled, rounds


def score(run, samples, tau, phases):
    """G completions per prompt (5.1) and their reward columns (4, or 10), group after group."""
    cfg, task, policy, G = run.cfg, run.task, run.policy, run.cfg.group_size
    with timed(phases, "rollout"), dist.gathered(policy.model):
        rollout = grpo.sample_groups(policy, [s.image() for s in samples], [task.prompt(s) for s in samples], G,
                                     cfg.temperature, cfg.max_new_tokens, finished=dist.all_done)
    with timed(phases, "reward"):
        per_row = [s for s in samples for _ in range(G)]  # N = B*G rows, group after group, as in the rollout
        input_sizes = [size for size in policy.input_sizes(rollout.batch) for _ in range(G)]
        scores = task.rewards(rollout.texts, per_row, input_sizes, tau)  # column -> (N,)
    return rollout, scores


def collect(run, train_set, samples, step, tau, phases):
    """This rank's rollout for the step: its `samples`, and with --dynamic-sampling more rounds."""
    rollout, scores = score(run, samples, tau, phases)
    if not run.cfg.dynamic_sampling:
        return Collected(rollout, scores, rollout, scores, {})
    G, want = run.cfg.group_size, len(samples)
    rounds, drawn = [(rollout, scores)], len(samples)
    for k in range(1, run.cfg.max_resample + 1):
        short = want - len(informative(rounds, G))
        if dist.total(max(short, 0)) == 0:  # every rank is full: the ranks end the round together
            break
        extra = [train_set[i] for i in resample_indices(step, k, run.cfg.batch_prompts, len(train_set), run.cfg.seed,
                                                        dist.rank(), dist.world())]
        rounds.append(score(run, extra, tau, phases))
        drawn += len(extra)
    kept = informative(rounds, G)[:want]
    agreed = min(dist.gather(torch.tensor([len(kept)])).tolist())  # as many as the rank with fewest
    kept = kept[:agreed]
    sampled = concat_rollouts([r for r, _ in rounds], G, run.policy.pad_id)
    seen = {key: torch.cat([s[key] for _, s in rounds]) for key in scores}
    stats = {"prompts_drawn": int(dist.total(drawn)), "groups_dropped": int(dist.total(drawn - len(kept))),
             "completions_sampled": int(dist.total(drawn * G)), "resample_rounds": len(rounds) - 1}
    if not kept:
        return Collected(None, None, sampled, seen, stats)
    rows = torch.tensor([g * G + j for g in kept for j in range(G)])
    return Collected(select_groups(sampled, kept, G, run.policy.pad_id), {key: v[rows] for key, v in seen.items()},
                     sampled, seen, stats)


def informative(rounds, G):
    """Indices, over the rounds' groups in the order drawn, of the groups whose rewards are not all equal."""
    rewards = torch.cat([s["reward"] for _, s in rounds]).view(-1, G)
    return (rewards.max(1).values > rewards.min(1).values).nonzero()[:, 0].tolist()


def concat_rollouts(rollouts, G, pad_id):
    """Rollouts one after the other as one: prompts left-padded alike (VLM.concat_batches), the
    completions right-padded to the longest (pad_id, mask 0, log-prob and entropy 0)."""
    if len(rollouts) == 1:
        return rollouts[0]
    T = max(r.completion_ids.shape[1] for r in rollouts)

    def right(t, value):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)
    return grpo.Rollout(VLM.concat_batches([r.batch for r in rollouts], pad_id),
                        torch.cat([right(r.completion_ids, pad_id) for r in rollouts]),
                        torch.cat([right(r.mask, 0) for r in rollouts]), [t for r in rollouts for t in r.texts],
                        torch.cat([right(r.logps, 0) for r in rollouts]), torch.cat([right(r.entropy, 0) for r in rollouts]))


def select_groups(rollout, groups, G, pad_id):
    """The groups `groups` (indices) of a rollout, in that order."""
    rows = [g * G + j for g in groups for j in range(G)]
    batch = VLM.concat_batches([VLM.select_rows(rollout.batch, g, g + 1) for g in groups], pad_id)
    return grpo.Rollout(batch, rollout.completion_ids[rows], rollout.mask[rows], [rollout.texts[r] for r in rows],
                        rollout.logps[rows], rollout.entropy[rows])
