"""Everything that crosses processes under torchrun, in one place (METHOD.md section 5.4).

Data parallel GRPO: each of K ranks takes B/K whole groups of the step, samples and scores them,
and adds its share of the *global* loss (weights normalised over all ranks); the gradients are then
summed across ranks, so every rank applies the update a single process would compute on all B
prompts. The curriculum sees every rank's IoUs, so tau is the same everywhere. With one process
every helper here is a no-op.

With --fsdp (`shard`) the weights are split too: each rank keeps 1/K of every transformer block
and of the rest of the model body, gathers a block's weights just before the block runs and frees
them after, and receives only its 1/K of the summed gradient (FSDP2's reduce-scatter). The output
layer (tied to the input embeddings in Qwen2.5-VL-3B) stays whole on every rank: the step calls
it outside the model body, chunk by chunk, and its gradient is summed like any replicated one.
"""
import contextlib
import functools
import gc
import json
import math
import os
import socket
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from files import RunError
from model import fsdp_units


_store = None   # this attempt's view of the launcher's key-value store (who_stopped reads it)
_attempt = 0    # set by join
_joined = None  # (store, rank, world size) once join has met torchrun's rendezvous


def attempt():
    """How many times torchrun has started this job's workers before (--max-restarts): 0 at first,
    the same number on every rank (join counts it in the launcher's store)."""
    return _attempt


def attempt_of(store, size):
    """This launch's attempt, agreed by every rank: each process of each attempt adds 1 to a counter
    in the store, so the n-th process to join is in attempt (n - 1) // size. torchrun's own
    TORCHELASTIC_RESTART_COUNT will not do: it counts the restarts of this node's agent only, and
    after one node's worker dies the other node restarts its workers without counting, so the two
    nodes' numbers (and keys) disagree. A store made afresh for each attempt starts again at 0."""
    return (store.add("medloc/joined", 1) - 1) // size


def join(fsdp=False, timeout=600):
    """Under torchrun, meet the rendezvous and agree on this attempt (attempt_of): before the run's
    config is read, since a restarted worker resumes the run only if every rank does. Returns the
    attempt (0 outside torchrun)."""
    global _joined, _attempt
    if (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not fsdp) or _joined or "MASTER_ADDR" not in os.environ:
        return _attempt  # one process, or no launcher's rendezvous to meet
    store, rank_, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    _joined, _attempt = (store, rank_, size), attempt_of(store, size)
    return _attempt


def joined():
    """True once this process has met torchrun's rendezvous (join)."""
    return _joined is not None


def setup(device, fsdp=False, timeout=600):
    """Join the process group when launched by torchrun (even alone, to shard); returns this rank's
    device. Every collective gives up after `timeout` seconds (--dist-timeout) instead of waiting
    for a rank that stopped or froze; NCCL's async error handling makes that so on CUDA. The
    group's keys in the launcher's store are this attempt's own: after an elastic restart the
    store still holds the dead workers' addresses under the first attempt's keys, and gloo would
    try to connect to them ("connectFullMesh ... Connection refused")."""
    global _store
    if (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not fsdp) or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # before the group: a timed-out collective ends the process
    limit = timedelta(seconds=timeout)
    join(fsdp, timeout)
    store, rank_, size = _joined
    _store = dist.PrefixStore(f"medloc/attempt-{_attempt}/", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=_store, rank=rank_, world_size=size, timeout=limit)
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def teardown(together=True):
    """Leave the process group (a process that exits inside it can abort at exit). `together`:
    every rank is here, so wait for all; False on an error path, where the others may not be."""
    if dist.is_initialized():
        gc.collect()  # sharded models freed while their process group still exists
        if together:
            dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def collective_device():
    """Where collectives run: NCCL moves CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def total(value):
    """Sum of a number over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item()


def gather(t):
    """Every rank's equally-sized 1-D tensor, concatenated in rank order (on t's device)."""
    if not dist.is_initialized():
        return t
    mine = t.detach().to(collective_device()).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(parts, mine)
    return torch.cat(parts).to(t.device)


def agree(problem):
    """Raise RunError on every rank when any rank has a problem (a line, or None): the first, with
    its rank and host, and how many other ranks had one. Before the process group, through the
    launcher's store (join's): a rank that cannot use its --device, or see the run folder, must
    say so before NCCL or gloo is asked to start on it."""
    if dist.is_initialized():
        verdicts = gather_objects((problem, socket.gethostname()))
    elif _joined:
        store, rank_, size = _joined
        key = f"medloc/attempt-{_attempt}/verdict/"
        store.set(key + str(rank_), json.dumps([problem, socket.gethostname()]))
        verdicts = [json.loads(store.get(key + str(r))) for r in range(size)]  # each waits for that rank's
    else:
        verdicts = [(problem, socket.gethostname())]
    found = [(r, p, host) for r, (p, host) in enumerate(verdicts) if p]
    if found:
        r, p, host = found[0]
        more = f" (and {len(found) - 1} other rank(s))" if len(found) > 1 else ""
        raise RunError(p if len(verdicts) == 1 else f"rank {r} on {host}{more}: {p}")


def gather_objects(obj):
    """Every rank's object (e.g. its RNG state), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params):
    """grad <- sum over ranks of grad (the loss weights are already global). Sharded gradients
    were summed by FSDP's reduce-scatter already."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None and not isinstance(p.grad, DTensor):
            dist.all_reduce(p.grad)


def everywhere(flag):
    """True when `flag` holds on every rank (a sharded model's forwards need every rank, so a
    loop over them ends on all ranks together)."""
    return total(not flag) == 0


def all_done(done):
    """grpo.sample_groups' `finished` under torchrun: every row of every rank has stopped."""
    return everywhere(done.all())


# ----------------------------------------------------------------------------- FSDP2
def sharder(fsdp, shard_size=0):
    """How --fsdp splits a model as it loads: None without it; `shard` over every process; with
    "hybrid", over groups of `shard_size` processes (default: a node's, torchrun's
    LOCAL_WORLD_SIZE), each group one whole copy (a 2-D mesh: replicate x shard). The weights'
    gathers then stay within a node, and only the gradients' all-reduce crosses nodes."""
    if not fsdp:
        return None
    if fsdp != "hybrid":
        return shard
    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world()))
    mesh = init_device_mesh(collective_device().type, (world() // size, size), mesh_dim_names=("replicate", "shard"))
    return functools.partial(shard, mesh=mesh)


def shard(model, compute_dtype=None, mesh=None):
    """Split a Qwen2(.5)-VL model over the ranks with FSDP2 (fully_shard), in place.

    Units: each decoder layer, each vision block, then the body (`model.model`: embeddings, norms,
    patch embedding, merger), whose forward is what the step calls. The output layer is left out
    (see the module docstring). Gradients are reduced as sums, not FSDP's default mean, since the
    loss weights are global already. `compute_dtype` (bf16 under bf16-mixed): the units gather
    their weights in it and reduce gradients in fp32, so the traffic is halved and the fp32
    masters stay exact. `mesh`: a 2-D (replicate, shard) mesh (`sharder`), else every rank shards."""
    body = model.model
    mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    policy = {"mp_policy": mixed} if mixed else {}
    if mesh is not None:
        policy["mesh"] = mesh
    for block in fsdp_units(model):  # each decoder layer and vision block, by the family's class names
        fully_shard(block, **policy)
    fully_shard(body, ignored_params={model.lm_head.weight}, **policy)
    for unit in body.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    # the step only reads the body's output (indexing, never in place), which this warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@contextlib.contextmanager
def gathered(model):
    """Inside the block a sharded model keeps each unit's weights once gathered (a rollout would
    otherwise gather every layer again for every decoded token); resharded on the way out. It
    holds the whole model for that time, the price of decoding at the speed of one device."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def trainable(model):
    """The parameters the optimizer steps. Of a sharded model, its shards: a unit that a forward
    left gathered (FSDP keeps the body whole after its forward) is split back first, or the list
    would hold gathered tensors that the next reshard frees."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return [p for p in model.parameters() if p.requires_grad]


def is_sharded(model):
    return isinstance(getattr(model, "model", None), FSDPModule)


def local(t):
    """This rank's part of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_gradients(params, max_norm):
    """Scale the gradient to norm <= max_norm; returns the norm before, the same on every rank.
    torch's clip_grad_norm_ when nothing is sharded; else the squares of the local shards summed
    over ranks (each shard as many times as there are copies of it, under --fsdp hybrid), plus
    those of the replicated gradients once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def square(gs):  # one sync per call
        gs = list(gs)
        return torch.stack([g.double().pow(2).sum() for g in gs]).sum().item() if gs else 0.0
    sharded = [g for g in grads if isinstance(g, DTensor)]
    copies = sharded[0].device_mesh.size(0) if sharded[0].device_mesh.ndim == 2 else 1
    norm = math.sqrt(total(square(local(g) for g in sharded)) / copies +
                     square(g for g in grads if not isinstance(g, DTensor)))
    scale = min(1.0, max_norm / (norm + 1e-6))
    for g in grads:
        local(g).mul_(scale)
    return norm


def full_state(model):
    """The whole state dict of a sharded model on rank 0, in CPU memory; {} on the other ranks;
    None if not sharded. Gathered one tensor at a time: no device holds more than one whole tensor
    beyond its shards."""
    if not is_sharded(model):
        return None
    state = {name: gathered_tensor(t) for name, t in model.state_dict().items()}  # every rank: collectives
    return state if is_main() else {}


def gathered_tensor(t, dtype=None):
    """A tensor made whole (a collective on every rank for a sharded one); on rank 0 copied into CPU
    memory, in `dtype` if given; None on the others, which have no use for a copy."""
    whole = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
    if not is_main():
        return None
    return (whole.to(dtype) if dtype is not None and whole.is_floating_point() else whole).cpu().contiguous()


def full_optimizer_state(optimizer):
    """optimizer.state_dict() with every sharded state tensor made whole on rank 0 (None on the
    others): the format a one-process run saves, so checkpoints move between K ranks and one."""
    state = optimizer.state_dict()
    # new dicts: state_dict() shares the per-parameter dicts with the live optimizer
    state["state"] = {i: dict(per_param) for i, per_param in state["state"].items()}
    for per_param in state["state"].values():
        for key, t in per_param.items():
            if isinstance(t, DTensor):
                whole = t.full_tensor()
                per_param[key] = whole.cpu() if is_main() else None
    return state


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, splitting whole state tensors like the parameters they belong to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in state["state"].items():
        p = params[index]
        if isinstance(p, DTensor):
            for key, t in per_param.items():
                if t.shape == p.shape:  # Adam's moments; its step counter stays a scalar
                    per_param[key] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(state)


def save_shards(model, optimizer, folder):
    """--checkpoint sharded: every rank writes its own shards of the weights and of AdamW's state
    (torch.distributed.checkpoint), so no process ever holds the whole; a tensor every rank holds
    whole (the output layer, data-parallel weights) is written once."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process", as it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_shards(model, optimizer, folder):
    """What save_shards wrote, each rank reading the parts it keeps now: under another process
    count, another mesh, or in one process (torch.distributed.checkpoint reshards by the tensors'
    global shapes). The optimizer's state is first made with a zero step (lr 0), then overwritten."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def from_main(obj):
    """Rank 0's `obj` (a verdict, a message) on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lost_peer(error):
    """True when `error` is a collective failing because another process of the job is gone or
    frozen (gloo: a RuntimeError "Connection closed by peer", or its wait past --dist-timeout;
    NCCL and the store: DistError)."""
    if not dist.is_initialized():
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(k in text for k in ("closed by peer", "Connection reset", "Timed out"))


def who_stopped(wait=5.0):
    """The ranks that stopped: each survivor marks itself alive in the launcher's store (torchrun's
    agent holds it, so it outlives the workers), and the ranks not marked within `wait` seconds
    are the ones gone or frozen. None when the store cannot be reached."""
    try:
        _store.set(f"alive/{rank()}", "1")
        deadline, missing = time.time() + wait, []
        while time.time() < deadline:
            missing = [r for r in range(world()) if not _store.check([f"alive/{r}"])]
            if not missing:
                break
            time.sleep(0.2)
        return missing
    except Exception:  # noqa: BLE001 - the store went with its process: the message says so
        return None


def lost_peer_message(error, run_dir, last):
    """The one line a survivor ends with: the rank(s) that stopped, the last checkpoint, how to resume."""
    gone = who_stopped()
    who = (f"rank {', '.join(map(str, gone))} of this job stopped" if gone else
           "another process of this job stopped (which one: the launcher's store is gone too)")
    return (f"error: rank {rank()}: {who} ({str(error).splitlines()[0][:120]}); last checkpoint: "
            f"{os.path.basename(last[-1]) if last else 'none'}; resume with: torchrun ... train.py --resume {run_dir}")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_same(value, what):
    """Raise unless `value` (a number) is identical on every rank."""
    if dist.is_initialized():
        values = gather_objects(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"{what} differs across ranks: {values}")
