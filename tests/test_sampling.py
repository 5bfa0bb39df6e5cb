"""The step's rollout (sampling.py) and DAPO's dynamic sampling (METHOD.md 5.8): merged processor
batches are the processor's own, the kept groups are the informative ones in the order drawn and
score as they did in the whole rollout, a step with none ends without an update, a resumed run
draws the same rounds, and two gloo ranks end each step together."""
import json

import torch

import sampling
import start
import train
from config import Config
from data import resample_indices
from model import VLM, load_vlm
from test_model import images


def test_batches_put_together_are_the_processors_batch_of_all_their_prompts():
    vlm = load_vlm("tiny")
    pictures, queries = images((60, 420), (500, 90), (230, 240)), ["a", "a much longer query than the others", "mid"]
    whole = vlm.encode(pictures, queries)
    parts = VLM.concat_batches([vlm.encode(pictures[:1], queries[:1]), vlm.encode(pictures[1:], queries[1:])], vlm.pad_id)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_resampled_rows_are_a_pure_function_of_seed_step_and_round_and_shared_between_ranks():
    rows = resample_indices(7, 2, 8, 100, 0)
    assert rows == resample_indices(7, 2, 8, 100, 0) and len(set(rows)) == 8
    assert rows != resample_indices(7, 3, 8, 100, 0) and rows != resample_indices(8, 2, 8, 100, 0)
    assert resample_indices(7, 2, 8, 100, 0, rank=0, world=2) + resample_indices(7, 2, 8, 100, 0, rank=1, world=2) == rows


def run_of(tmp_path, **settings):
    """A run set up as train.py sets one up (the shipped warm start), without its loop."""
    cfg = Config(dataset="synth:derm", eval_dataset="none", threads=1, out=str(tmp_path), **settings)
    train_set, _, _, labels = start.load_data(cfg)
    policy, task = start.new_policy(cfg, "cpu", labels)
    return start.begin(cfg, str(tmp_path), "cpu", policy, task), train_set


def test_dynamic_sampling_keeps_the_informative_groups_in_the_order_drawn(tmp_path):
    run, train_set = run_of(tmp_path, dynamic_sampling=True, max_resample=3, batch_prompts=4, group_size=4,
                            schedule="fixed", tau=0.75)  # some groups all hit or all miss, others not
    torch.manual_seed(0)
    samples = [train_set[i] for i in range(4)]
    got = sampling.collect(run, train_set, samples, 1, run.schedule.tau, {})
    G, rewards = 4, got.seen["reward"].view(-1, 4)
    informative = [g for g in range(len(rewards)) if rewards[g].max() > rewards[g].min()]
    s = got.stats
    assert s["prompts_drawn"] == 4 * (s["resample_rounds"] + 1) == len(rewards)
    assert s["completions_sampled"] == G * s["prompts_drawn"]
    kept = informative[:4]
    assert s["groups_dropped"] == len(rewards) - len(kept) and 0 < len(kept)
    assert s["groups_dropped"] > 0 and s["resample_rounds"] > 0  # this start: some groups all hit or all miss
    assert len(kept) == 4 or s["resample_rounds"] == 3  # full, or every round spent
    assert len([g for g in informative if g < 4 * s["resample_rounds"]]) < 4  # no round after it was full
    rows = torch.tensor([g * G + j for g in kept for j in range(G)])
    assert torch.equal(got.scores["reward"], got.seen["reward"][rows])
    assert torch.equal(got.rollout.completion_ids, got.sampled.completion_ids[rows])
    # the kept groups' prompts, padded for another batch, score their completions as in the whole one
    policy = run.policy
    alone = policy.completion_logps(got.rollout.batch, got.rollout.completion_ids, 0.9, got.rollout.mask)
    whole = policy.completion_logps(got.sampled.batch, got.sampled.completion_ids, 0.9, got.sampled.mask)[rows]
    assert torch.allclose(alone, whole, atol=1e-5)


def test_a_step_without_an_informative_group_ends_without_an_update_and_says_so(tmp_path, capsys):
    """Threshold 1.0 and no format reward: every completion's reward is 0, every group is all-equal."""
    run, train_set = run_of(tmp_path, dynamic_sampling=True, max_resample=2, schedule="fixed", tau=1.0, w_fmt=0.0,
                            batch_prompts=2, group_size=2)
    before = {k: v.clone() for k, v in run.policy.model.state_dict().items()}
    record = train.grpo_step(run, train_set, [train_set[0], train_set[1]], 5, {})
    assert "step 5: no informative group in 3 rounds; no update" in capsys.readouterr().out
    assert record["prompts_drawn"] == 6 and record["groups_dropped"] == 6 and "loss" not in record
    assert all(torch.equal(v, run.policy.model.state_dict()[k]) for k, v in before.items())


def test_a_dynamic_sampling_run_resumes_bit_identical(tmp_path):
    common = ["--dataset", "synth:derm", "--dynamic-sampling", "--batch-prompts", "2", "--group-size", "4",
              "--eval-dataset", "none", "--threads", "1", "--save-every", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(common + ["--steps", "2", "--out", str(straight)])
    train.main(common + ["--steps", "1", "--out", str(resumed)])
    train.main(["--resume", str(resumed), "--steps", "2"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if "seconds" not in k} for l in open(p)]  # noqa: E731
    log = strip(straight / "metrics.jsonl")
    assert log == strip(resumed / "metrics.jsonl") and any(r["resample_rounds"] > 0 for r in log)
    assert (straight / "final" / "model.safetensors").read_bytes() == (resumed / "final" / "model.safetensors").read_bytes()


def test_two_gloo_ranks_fill_their_shares_and_end_each_step_together(tmp_path):
    from test_dist import torchrun
    torchrun(["train.py", "--dataset", "synth:derm", "--dynamic-sampling", "--batch-prompts", "4", "--group-size", "4",
              "--steps", "2", "--eval-dataset", "none", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "two")])
    log = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(log) == 2
    for r in log:  # each of the two ranks drew 2 prompts a round, and both ran every round
        assert r["prompts_drawn"] == 4 * (r["resample_rounds"] + 1) and r["completions_sampled"] == 4 * r["prompts_drawn"]
        assert (r["prompts_drawn"] - r["groups_dropped"]) % 2 == 0  # as many groups kept on either rank


def test_the_flag_off_is_the_step_as_it_was(tmp_path):
    """Without --dynamic-sampling, collect is one rollout, scored, every group kept."""
    run, train_set = run_of(tmp_path, batch_prompts=2, group_size=4)
    got = sampling.collect(run, train_set, [train_set[0], train_set[1]], 1, run.schedule.tau, {})
    assert got.rollout is got.sampled and got.scores is got.seen and got.stats == {}


def test_the_dapo_recipe_sets_its_four_flags_and_flags_given_beside_it_win():
    from config import load_config
    dapo = load_config({"recipe": "dapo"})
    assert (dapo.eps_high, dapo.loss_type, dapo.dynamic_sampling, dapo.beta) == (0.28, "bnpo", True, 0.0)
    mine = load_config({"recipe": "dapo", "beta": 0.01, "eps_high": 0.3})
    assert (mine.eps_high, mine.loss_type, mine.dynamic_sampling, mine.beta) == (0.3, "bnpo", True, 0.01)
    plain = load_config({})
    assert (plain.eps_high, plain.loss_type, plain.dynamic_sampling, plain.beta) == (None, "grpo", False, 0.04)
