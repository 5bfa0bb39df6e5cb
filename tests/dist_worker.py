"""Run by tests/test_dist.py, under torchrun (K processes) or alone: one GRPO update per loss type on
fixed rollouts, and the curriculum on fixed IoUs; writes what rank 0 ends with to OUT/.
`--fsdp`: the policy and the reference are sharded over the processes (FSDP2)."""
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist  # noqa: E402
import grpo  # noqa: E402
from measure import resident  # noqa: E402
import model  # noqa: E402
import start  # noqa: E402
import train  # noqa: E402
from config import Config  # noqa: E402
from model import VLM, load_vlm  # noqa: E402
from test_model import images  # noqa: E402

B, G = 4, 2


def my_share(rollout, advantages):
    """This rank's whole groups of a rollout of all B prompts."""
    k, r = dist.world(), dist.rank()
    p0, p1 = r * B // k, (r + 1) * B // k
    rows = slice(p0 * G, p1 * G)
    return (grpo.Rollout(VLM.select_rows(rollout.batch, p0, p1), rollout.completion_ids[rows],
                         rollout.mask[rows], rollout.texts[rows], rollout.logps[rows]), advantages[rows])


def updates(out, fsdp):
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        policy = load_vlm("tiny")
        torch.manual_seed(0)  # the same rollout on every rank, different completion lengths
        rollout = grpo.sample_groups(policy, images((200, 300), (380, 170), (160, 160), (300, 200)),
                                     ["a", "bb", "ccc", "dddd"], G, 1.3, 10)
        advantages = torch.randn(B * G, generator=torch.Generator().manual_seed(1))
        # plain SGD without clipping: unlike AdamW's first step, it shows any error in the gradient's scale
        cfg = Config(batch_prompts=B, group_size=G, max_new_tokens=10, loss_type=loss_type, lr=0.1,
                     temperature=1.3, micro_batch=G, grad_clip=1e9)
        ref = policy.frozen_copy()
        if fsdp:
            dist.shard(policy.model)
            dist.shard(ref.model)
        params = dist.trainable(policy.model)
        run = start.Run(cfg, None, policy, ref, torch.optim.SGD(params, lr=cfg.lr), params, None)
        train.policy_update(run, *my_share(rollout, advantages), {})
        weights = dist.full_state(policy.model)
        if dist.is_main():
            torch.save(weights or policy.model.state_dict(), os.path.join(out, f"{loss_type}.pt"))


def curriculum(out):
    schedule = start.make_run_schedule(Config(window=2, no_reward_check=True, no_stability_check=True))
    g = torch.Generator().manual_seed(2)
    taus = []
    for _ in range(8):
        ious = 0.3 + 0.7 * torch.rand(B * G, generator=g)  # the same numbers on every rank
        share = ious.view(dist.world(), -1)[dist.rank()]
        schedule.update(dist.gather(share))
        taus.append(schedule.tau)
    with open(os.path.join(out, f"taus-{dist.rank()}.json"), "w") as f:
        json.dump(taus, f)


def gather_counts(out):
    """FSDP all-gathers during a 10-token rollout of a sharded model, left to itself and inside
    dist.gathered, and the tokens each drew (the same seed)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
    real, count = group.foreach_all_gather, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    group.foreach_all_gather = counting
    policy = load_vlm("tiny")
    dist.shard(policy.model)
    result = {}
    for mode in ("plain", "gathered"):
        count[0] = 0
        torch.manual_seed(0)
        with dist.gathered(policy.model) if mode == "gathered" else contextlib.nullcontext():
            r = grpo.sample_groups(policy, images((200, 300), (380, 170)), ["a", "bb"], 2, 1.3, 10,
                                   finished=dist.all_done)
        result[mode] = {"gathers": count[0], "ids": r.completion_ids.tolist()}
    group.foreach_all_gather = real
    if dist.is_main():
        with open(os.path.join(out, "gathers.json"), "w") as f:
            json.dump(result, f)


def sharded_setup(out, folder):
    """Load the weights of `folder` split over the ranks: the whole weights (gathered to rank 0),
    the peak resident memory the load added to this process, and the bytes of what it keeps."""
    config = model.model_config(folder)
    before = resident("VmRSS")
    loaded = model.load_sharded(model.FAMILIES[config.model_type].model, config, folder, torch.float32, None,
                                "cpu", dist.shard, False, False)
    grown = resident("VmHWM") - before
    kept = sum(dist.local(p).numel() * p.element_size() for p in loaded.parameters())  # tied ones once
    weights = dist.full_state(loaded)
    if dist.is_main():
        torch.save(weights, os.path.join(out, "weights.pt"))
    with open(os.path.join(out, f"memory-{dist.rank()}.json"), "w") as f:
        json.dump({"grown": grown, "kept": kept}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--setup" in sys.argv:  # before anything else touches memory
        dist.setup("cpu", fsdp=True)
        sharded_setup(sys.argv[1], sys.argv[sys.argv.index("--setup") + 1])
        dist.teardown()
        sys.exit()
    dist.setup("cpu", fsdp="--fsdp" in sys.argv)
    updates(sys.argv[1], "--fsdp" in sys.argv)
    curriculum(sys.argv[1])
    if "--fsdp" in sys.argv:
        gather_counts(sys.argv[1])
    dist.teardown()
