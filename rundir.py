"""The run folder: one trainer at a time, checkpoints that are complete or absent, a log that is JSON,
the curves, and the step's timer and finiteness check.

    RUN/config.json          the run's settings; paths inside the run are written "{run}/..."
    RUN/metrics.jsonl        one JSON object per step (non-finite numbers become null)
    RUN/checkpoint-<step>/   model/ (a save_pretrained folder) + trainer_state.pt (with AdamW's state)
                             or, with --checkpoint sharded: sharded/ (each rank's shards of the
                             weights and AdamW state), model/ (config and processor, no weights)
                             + trainer_state.pt
    RUN/final/               the trained model folder (a sharded run's streamed unit by unit, with an index)
    RUN/.lock                held by the trainer that owns the folder (released when it exits or dies)

trainer_state.pt holds only tensors, numbers, strings, lists and dicts and is read with
`torch.load(weights_only=True)`: a crafted file from a shared run folder cannot run code.
"""
import contextlib
import glob
import json
import math
import os
import random
import secrets
import shutil
import socket
import time

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from dist import (barrier, everywhere, from_main, full_state, gather_objects, gathered_tensor, is_main, is_sharded, local,
                  save_shards, world)
from files import Lock, RunError, first_line, make_folder, reason_of
from model import file_key


def remove_leftovers(run_dir):
    """Temporary files and folders of a killed run (only ever half-written); call holding the lock."""
    for tmp in glob.glob(os.path.join(run_dir, "*.tmp")) + glob.glob(os.path.join(run_dir, "*", "*.tmp")):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        else:  # a file, or a link (removed itself: what it points to is not the run's)
            os.remove(tmp)


@contextlib.contextmanager
def claim(run_dir, resume):
    """Hold the run folder: rank 0 creates and locks it and checks it may be used; every rank acts
    on that verdict before anything touches the folder (so a refused second torchrun job cannot
    delete the first one's files from another rank)."""
    lock, problem, made = None, None, first_missing(run_dir)
    had_lock = os.path.exists(os.path.join(run_dir, ".lock"))
    if is_main():
        try:
            make_folder(run_dir, "the run folder")
            lock = Lock(run_dir).__enter__()
            if not resume and os.path.exists(os.path.join(run_dir, "config.json")):
                raise RunError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
            remove_leftovers(run_dir)
        except RunError as e:
            problem = str(e)
    problem = from_main(problem) or blind_ranks(run_dir)
    try:
        if problem:
            raise RunError(problem)
        yield
    except BaseException:  # a refusal, an error or Ctrl-C before anything could be resumed
        kept = ("config.json", "final", os.path.join("warmstart", "model"))  # resumable, or work done (a warm start)
        if lock and not checkpoints(run_dir) and not any(os.path.exists(os.path.join(run_dir, k)) for k in kept):
            if made:
                shutil.rmtree(made, ignore_errors=True)  # the folders this command made, and nothing else
            elif not had_lock:  # the user's own folder, as it was
                os.remove(os.path.join(run_dir, ".lock"))
        raise
    finally:
        if lock:
            lock.__exit__()


def say_written(run_dir):
    """The end of a run (rank 0): what it wrote, and where."""
    if is_main():
        names = [n for n in ("final", "eval.json", "metrics.jsonl", "curves.png") if os.path.exists(os.path.join(run_dir, n))]
        kept = [os.path.basename(c) for c in checkpoints(run_dir)]
        print(f"wrote {run_dir}: " + ", ".join(n + "/" if n == "final" else n for n in names)
              + (f", {', '.join(kept)} (resumable with --resume {run_dir})" if kept else ""))


def first_missing(path):
    """The topmost folder of `path` that does not exist yet (what creating it makes), or None."""
    top = None
    while path and not os.path.exists(path):
        top, path = path, os.path.dirname(path.rstrip(os.sep))
    return top


def blind_ranks(run_dir, wait=10.0):
    """None when every rank sees the run folder that rank 0 holds, else the line saying which
    ranks do not: rank 0 alone writes it, and every rank reads its checkpoints, so it must be on
    storage every node sees. A file rank 0 writes there is looked for on every rank (for up to
    `wait` seconds: a network file system may show a new file late)."""
    if world() == 1:
        return None
    marker = os.path.join(run_dir, f".seen-{from_main(secrets.token_hex(8))}")
    if is_main():
        open(marker, "w").close()
    barrier()
    deadline = time.time() + wait
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.5)
    seen = gather_objects((os.path.exists(marker), socket.gethostname()))
    if is_main():
        os.remove(marker)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    return (f"{', '.join(blind)} cannot see the run folder {run_dir} (a file rank 0 wrote there is not there): "
            "the run folder must be on storage every node sees (a shared file system), not a node's own disk") if blind else None


# ----------------------------------------------------------------------------- paths in config.json




# ----------------------------------------------------------------------------- RNG state as plain data
def rng_state():
    """Every generator's state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def all_finite(params):
    """True when every tensor of `params` (a model or an iterable of tensors) is finite; one sync.
    Of a sharded tensor, this rank's part."""
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    return bool(torch.stack([torch.isfinite(local(p)).all() for p in params]).all()) if params else True


def save_checkpoint(run_dir, step, policy, optimizer_state, schedule, keep, rngs=None, weights=None):
    """checkpoint-<step>/ = model folder + trainer state, written to a temp folder then renamed;
    older checkpoints are deleted only after. `rngs`: every rank's RNG state, in rank order;
    `weights`: a sharded model's whole state dict (dist.full_state). Refuses non-finite weights;
    a failed write leaves no temp folder and the previous one intact."""
    if not all_finite(weights.values() if weights else policy.model):
        raise RunError(f"step {step}: the weights are not finite; not saving them over checkpoint(s) "
                       f"{[os.path.basename(c) for c in checkpoints(run_dir)]}")
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(os.path.join(tmp, "model"), weights)
        torch.save({"step": step, "optimizer": optimizer_state, "schedule": schedule.state_dict(),
                    "rng": rngs or [rng_state()]}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as e:  # Ctrl-C included: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save's zip writer fails as RuntimeError
            raise
        previous = checkpoints(run_dir)
        kept = f"{os.path.basename(previous[-1])} is intact" if previous else "no earlier checkpoint exists"
        raise RunError(f"step {step}: could not write the checkpoint ({reason_of(e)}); {kept}")
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def save_sharded_checkpoint(run_dir, step, run, rngs):
    """checkpoint-<step>/ written by every rank at once (--checkpoint sharded): sharded/ holds each
    rank's shards of the weights and AdamW state (dist.save_shards), model/ the config and processor
    (no weights), trainer_state.pt the step, schedule and every rank's RNG state. Into a temp folder
    that rank 0 renames once every rank has written, so a half-written one is never resumed from."""
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    if not everywhere(all_finite(run.policy.model)):
        raise RunError(f"step {step}: the weights are not finite; not saving them over checkpoint(s) "
                       f"{[os.path.basename(c) for c in checkpoints(run_dir)]}")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        save_shards(run.policy.model, run.optimizer, os.path.join(tmp, "sharded"))
        if is_main():
            run.policy.save(os.path.join(tmp, "model"), weights=False)
            torch.save({"step": step, "schedule": run.schedule.state_dict(), "rng": rngs},
                       os.path.join(tmp, "trainer_state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # a rank's failed write fails the collective save on every rank
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"step {step}: could not write the sharded checkpoint ({reason_of(e)})")
    barrier()
    if is_main():
        for old in checkpoints(run_dir)[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old)


def whole_shards(folder):
    """Raise RunError unless every file a sharded checkpoint's metadata names is there with exactly
    the length the metadata gives it (its last item's end): shorter is cut short, longer is another
    layout's shard. A same-length shard of another run is not caught (the shards carry no digest)."""
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing or cut short: the checkpoint is unusable
        raise RunError(f"{folder}: unreadable shard metadata ({first_line(e)})")
    ends = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in ends.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != end:
            size = os.path.getsize(path) if os.path.isfile(path) else None
            raise RunError(f"{path}: {'missing' if size is None else 'cut short' if size < end else 'longer than its metadata says (another layout)'}")


def save_model(policy, folder, weights=None, dtype=None):
    """A save_pretrained folder (final/, warmstart/model), written whole or not at all (in `dtype`
    if given)."""
    if not all_finite(weights.values() if weights else policy.model):
        raise RunError(f"the weights are not finite; {folder} not written")
    tmp = folder + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(tmp, weights, dtype)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        raise RunError(f"could not write {folder} ({reason_of(e)}); the last checkpoint is intact")


def save_final(policy, folder, cfg):
    """final/ in --final-dtype (the model's published dtype by default), on every rank: a sharded
    model under --checkpoint sharded streamed unit by unit (save_streamed), else gathered whole to
    rank 0 (one tensor at a time) and written there."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.final_dtype, policy.published_dtype)
    if cfg.checkpoint == "sharded" and is_sharded(policy.model):
        return save_streamed(policy, folder, dtype)
    weights = full_state(policy.model)
    if is_main():
        save_model(policy, folder, weights, dtype)


def units(model):
    """The model's weights in the groups save_streamed writes: each decoder layer, each vision
    block, then the rest; the output layer left out when it is the input embeddings (tied), as
    save_pretrained leaves it out."""
    groups = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        parts = name.split(".")
        kind = next((p for p in ("layers", "blocks") if p in parts), None)
        unit = ".".join(parts[:parts.index(kind) + 2]) if kind else "rest"  # e.g. model.language_model.layers.3
        groups.setdefault(unit, []).append(name)
    return list(groups.values())


def save_streamed(policy, folder, dtype=None):
    """A save_pretrained folder of a sharded model that no process ever holds whole: unit by unit
    (units), each unit's tensors gathered whole to rank 0, written as a safetensors file of their
    own and freed; model.safetensors.index.json names each weight's file, as transformers splits a
    large model. Refuses non-finite weights; into a temp folder, renamed by rank 0 when whole."""
    if not everywhere(all_finite(policy.model)):
        raise RunError(f"the weights are not finite; {folder} not written")
    tmp, state, groups = folder + ".tmp", policy.model.state_dict(), units(policy.model)
    keys = policy.family.keys  # the names save_pretrained writes
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(tmp, weights=False, dtype=dtype)
    index = {}
    for k, names in enumerate(groups, 1):
        whole = {file_key(n, keys): gathered_tensor(state[n], dtype) for n in names}  # every rank: a collective
        if is_main():
            path = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file(whole, os.path.join(tmp, path), metadata={"format": "pt"})
            index.update({key: path for key in whole})
        del whole
    if is_main():
        total = sum(state[n].numel() * (dtype or state[n].dtype).itemsize for names in groups for n in names)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    barrier()


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint-[0-9]*[0-9]")))


def read_checkpoint(folder):
    """The trainer state of a checkpoint whose files are all whole; raises RunError otherwise."""
    try:
        # onto the CPU first, wherever it was saved (a GPU run's optimizer state names cuda:N):
        # the optimizer then places each tensor with its parameter, on this run's device or shard
        state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=True, map_location="cpu")
    except Exception as e:  # missing, empty, truncated, or holding more than plain data
        raise RunError(f"{folder}: trainer_state.pt is unreadable ({type(e).__name__}: {str(e)[:120]})")
    if os.path.isdir(os.path.join(folder, "sharded")):
        if not os.path.isfile(os.path.join(folder, "model", "config.json")):
            raise RunError(f"{folder}: model/config.json is missing (the policy is built from it)")
        whole_shards(os.path.join(folder, "sharded"))
        return state
    weights = glob.glob(os.path.join(folder, "model", "*.safetensors"))
    if not weights:
        raise RunError(f"{folder}: no model weights")
    for path in weights:
        try:
            with safe_open(path, "pt") as f:  # checks the header against the file's length
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:
            raise RunError(f"{path}: damaged ({str(e)[:120]})")
    return state


def latest_intact(run_dir):
    """(folder, trainer state) of the newest checkpoint that reads back whole, and the reasons
    the newer ones were passed over; (None, None, reasons) if there is none."""
    skipped = []
    for folder in reversed(checkpoints(run_dir)):
        try:
            return folder, read_checkpoint(folder), skipped
        except RunError as e:
            skipped.append(str(e))
    return None, None, skipped


# ----------------------------------------------------------------------------- the metrics log
def _finite_or_null(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps({k: _finite_or_null(v) for k, v in record.items()}, allow_nan=False) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to `step` (a half-written last line is dropped); temp file, then rename."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # cut off by a kill mid-write
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                keep.append(json.dumps(record) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the picture of a run
def running_mean(values, k=10):
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot_curves(run_dir, margin=None):
    """RUN/curves.png from metrics.jsonl: what the curriculum saw and did, step by step (tau and
    the hit rate; the window's r_bar and sigma against P(tau) and S(tau); m_bar against the margin
    Delta; the reward and the KL; the sampled tokens' entropy), or the loss of an SFT run, in two rows
    of panels. Written to a temp file, then renamed; returns each panel's title -> its legend's labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    if not log:
        return
    steps = [r["step"] for r in log]

    def series(key):
        return [r.get(key) if r.get(key) is not None else math.nan for r in log]
    panels = [p for p in (("tau", "hit_rate", "acc_mean"), ("r_bar", "sigma"), ("m_bar",), ("reward_mean", "kl"),
                          ("entropy",), ("loss",)) if any(k in log[-1] for k in p)]
    if "reward_mean" in log[-1]:
        panels = [p for p in panels if p != ("loss",)]  # a GRPO run's loss is not what to watch
    cols = math.ceil(len(panels) / 2) if len(panels) > 2 else len(panels)  # two rows: legible on a laptop
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5.2 * cols, 4.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    titles = {"tau": "the curriculum", "r_bar": "window: reward and stability checks", "m_bar": "window: margin check",
              "reward_mean": "reward and KL", "entropy": "entropy of the sampled tokens (nats)", "loss": "loss"}
    legends = {}
    for ax, keys in zip(axes.flat, panels):
        ax.set_title(titles[keys[0]], fontsize=9)
        for key in keys:
            if key not in log[-1]:
                continue
            values = series(key)
            smoothed = key in ("hit_rate", "acc_mean", "reward_mean", "kl", "entropy", "loss")
            line, = ax.plot(steps, running_mean(values) if smoothed else values,
                            label=key + (" (10-step mean)" if smoothed else ""), drawstyle="steps-post" if key == "tau" else "default")
            bar = {"r_bar": "P", "sigma": "S"}.get(key)
            if bar and bar in log[-1]:
                ax.plot(steps, series(bar), "--", color=line.get_color(), label=f"{bar}(tau)", drawstyle="steps-post")
        if keys == ("m_bar",) and margin is not None:
            ax.axhline(margin, ls="--", color="gray", label=f"Delta = {margin}")
        if keys == ("reward_mean", "kl") and "kl" in log[-1]:
            ax.lines[-1].remove()  # the KL is small next to the reward: its own axis
            twin = ax.twinx()
            twin.plot(steps, running_mean(series("kl")), color="tab:red", label="kl (10-step mean, right axis)")
            twin.set_ylabel("kl", color="tab:red")
            ax.twin = twin
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        handles = ax.get_lines() + (ax.twin.get_lines() if hasattr(ax, "twin") else [])  # the KL's line too
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)  # below the axes: it covers no curve
        legends[titles[keys[0]]] = [h.get_label() for h in handles]
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return legends


# ----------------------------------------------------------------------------- what stops a run, what its phases cost
@contextlib.contextmanager
def timed(phases, name):
    """Add the wall time of the block to phases[name] (CUDA work is waited for, so it counts)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    yield
    sync()
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


class Diverged(Exception):
    """The loss, the gradient or the weights stopped being finite."""


def check_finite(what, value):
    if not math.isfinite(value):
        raise Diverged(f"{what} is {value}")
    return value


class Stopped(Exception):
    """Ctrl-C; carries the last finished step."""

    def __init__(self, step):
        self.step = step
