"""Everything that crosses processes under torchrun, in one place (METHOD.md section 5.4).

Data parallel GRPO: each of K ranks takes B/K whole groups of the step, samples and scores them,
and adds its share of the *global* loss (weights normalised over all ranks); the gradients are then
summed across ranks, so every rank applies the update a single process would compute on all B
prompts. The curriculum sees every rank's IoUs, so tau is the same everywhere. With one process
every helper here is a no-op.
"""
import os

import torch
import torch.distributed as dist


def setup(device):
    """Join the process group when launched by torchrun; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def teardown():
    """Leave the process group (a process that exits inside it can abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def _wire():
    """Where collectives run: NCCL moves CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def total(value):
    """Sum of a number over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=_wire())
    dist.all_reduce(t)
    return t.item()


def gather(t):
    """Every rank's equally-sized 1-D tensor, concatenated in rank order (on t's device)."""
    if not dist.is_initialized():
        return t
    mine = t.detach().to(_wire()).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(parts, mine)
    return torch.cat(parts).to(t.device)


def gather_objects(obj):
    """Every rank's object (e.g. its RNG state), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params):
    """grad <- sum over ranks of grad (the loss weights are already global)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_same(value, what):
    """Raise unless `value` (a number) is identical on every rank."""
    if dist.is_initialized():
        values = gather_objects(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"{what} differs across ranks: {values}")
