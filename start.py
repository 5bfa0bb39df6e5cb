"""The beginning of a run, new or resumed: data, policy, task, reference, adapters, optimizer and
schedule, gathered in the one small object the training loop threads (`Run`).

    load_data -> load_policy (split as it loads under --fsdp) + settle (the model-dependent defaults, the task)
              -> [train.py's SFT warm start] -> begin: adapters, config.json, reference, optimizer
    or: resume, which restores all of it from the newest intact checkpoint of the run folder.
"""
import dataclasses
import functools
import json
import os

import torch

import dist
import lora
import rundir
import tasks
from config import PATH_KEYS, Config, check, load_config, parse_args, parse_box_scale, parse_stages, to_config_path
from data import (DataError, first_records, labels_from_json, load_class_dataset, load_dataset, several_boxes,
                  synth_spec, with_knowledge)
from model import FAMILIES, FRAMES, TINY_WARM_START, load_vlm, model_config, unsupported
from files import RunError, write_json
from scheduler import make_schedule


@dataclasses.dataclass
class Run:
    """What the training loop threads: the settings, the task, the policy and its frozen KL
    reference (None when beta = 0), the optimizer over the trainable parameters, the schedule."""
    cfg: object
    task: object
    policy: object
    ref: object
    optimizer: torch.optim.Optimizer
    params: list
    schedule: object


# ----------------------------------------------------------------------------- data
def configure(argv):
    """The run's Config, checked, and this rank's device. Under torchrun every rank meets the
    rendezvous first and the ranks agree on one verdict before any process group starts: a rank that
    cannot read --resume's folder (a node that does not see it), has no GPU for --device cuda or
    fails a check stops every rank with one line naming it, instead of a traceback on every rank."""
    world, given, problem, cfg = int(os.environ.get("WORLD_SIZE", "1")), parse_args(argv), None, None
    attempt = dist.join(bool(given.get("fsdp")), given.get("dist_timeout", Config.dist_timeout))  # before load_config
    try:
        cfg = load_config(given, restarted=attempt > 0)
        check(cfg, world)  # torchrun's process count
    except RunError as e:
        if world == 1 or not dist.joined():  # no other rank to tell
            raise
        problem = str(e)
    dist.agree(problem)  # before the process group: NCCL on a rank without a GPU ends in a traceback
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return cfg, dist.setup(device, cfg.fsdp, cfg.dist_timeout)


def default_eval_spec(cfg):
    """'auto': the test split of a synthetic training set; no evaluation for a JSONL set."""
    if cfg.eval_dataset != "auto":
        return cfg.eval_dataset
    return f"synth:{synth_spec(cfg.dataset)[0]}:test" if cfg.dataset.startswith("synth:") else "none"


def load_data(cfg):
    """(train set, eval set or None, eval spec, labels or None); bad data ends the run with the
    loader's message. The synthetic benchmark is one fixed draw: --seed varies training, not the data."""
    spec = default_eval_spec(cfg)
    if cfg.task == "classify":
        knowledge_file = cfg.knowledge if isinstance(cfg.knowledge, str) else None
        train_set, labels = load_class_dataset(cfg.dataset, cfg.labels or knowledge_file, "train", cfg.image_root,
                                               cfg.skip_invalid)
        train_set = first_records(train_set, cfg.train_size, cfg.dataset) if cfg.train_size else train_set
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
    train_set = first_records(train_set, cfg.train_size, cfg.dataset) if cfg.train_size else train_set
    eval_set = None if spec == "none" else load_dataset(spec, "test", cfg.image_root, cfg.skip_invalid,
                                                         cfg.eval_n, box_format=cfg.box_format)
    if cfg.task == "ground" and several_boxes(train_set):
        if cfg.sft_box_scale or cfg.reward == "giou":
            raise DataError(f"{cfg.dataset} gives several boxes per query: --sft-box-scale and --reward giou have "
                            "no several-box form (METHOD.md 4.2)")
        cfg.task = "ground-multi"
        print(f"{cfg.dataset} gives its records' boxes as lists: several boxes per query (--task ground-multi, "
              "METHOD.md 4.2)")
    if cfg.task == "ground" and eval_set is not None and several_boxes(eval_set):
        raise DataError(f"--eval-dataset {spec}: several boxes per query, and {cfg.dataset} one: pass "
                        "--task ground-multi to train on several")
    return train_set, eval_set, spec, None


# ----------------------------------------------------------------------------- what the run says first
def banner(cfg, family, device, train_set, eval_set, eval_spec, run_dir):
    """The start of a run in a few lines (rank 0), before anything long: where everything goes, what
    model in what frame on what device, what data, what method; and what the user would otherwise
    learn too late. `family`: check_models' (model_type, the tiny one?)."""
    if not dist.is_main():
        return
    (model_type, tiny), G = family, cfg.group_size
    precision = cfg.precision if cfg.precision != "auto" else "bf16-mixed" if device.startswith("cuda") else "fp32"
    method = (f"SFT, B={cfg.batch_prompts}" if cfg.algo == "sft" else f"GRPO, B={cfg.batch_prompts} x G={G}"
              + (f", schedule {cfg.schedule}" if cfg.task != "classify" else ""))
    print(f"run folder  {run_dir}: metrics.jsonl and curves.png as it goes, checkpoint-N/, final/ (the model), "
          f"eval.json")
    print(f"model       {cfg.init or cfg.model} ({model_type}; boxes in {FRAMES[FAMILIES[model_type].coord]}) "
          f"on {device}, {precision}")
    print(f"data        {cfg.dataset}: {len(train_set):,} training records; evaluation: "
          + (f"{eval_spec}, {len(eval_set):,} records" if eval_set else "none"))
    print(f"method      {method}, {cfg.steps} steps" + (f", resumed from {cfg.resume}" if cfg.resume else ""))
    if eval_set is None:
        why = "--eval-dataset none" if cfg.eval_dataset == "none" else f"{cfg.dataset} has no built-in test split"
        print(f"no evaluation at the end: {why}; pass --eval-dataset FILE, "
              f"or run eval.py --model {run_dir}/final --dataset FILE afterwards")
    if tiny and not cfg.dataset.startswith("synth:"):
        print("note: the built-in tiny model knows only the synthetic images it was warmed up on; on your own images "
              "its answers will not parse. Train a real VLM: --model Qwen/Qwen2.5-VL-3B-Instruct (README, On a "
              "real model)")


# ----------------------------------------------------------------------------- policy and task
def load_policy(cfg, name, device):
    """A policy or reference from `name` (a one-line error for a missing model or family), split
    over the processes as it loads under --fsdp."""
    try:
        vlm = load_vlm(name, device, cfg.precision, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                       gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision,
                       template=cfg.template, seed=cfg.seed, shard=dist.sharder(cfg.fsdp, cfg.shard_size))
    except ValueError as e:
        raise RunError(str(e))
    if cfg.compile:  # compiled at the first rollout (a reference never decodes)
        vlm.compile_decoding()
    return vlm


def settle(cfg, vlm, labels):
    """Fill the defaults that depend on the model (tiny vs pretrained); return the run's task,
    whose fields the policy will write into every saved config.json."""
    tiny_fresh = vlm.is_tiny and cfg.init is None and cfg.model == "tiny"
    if cfg.lr is None:
        cfg.lr = 1e-4 if vlm.is_tiny else 1e-6
        if cfg.lora_rank:  # LoRA moves a few parameters: its usual rate is 10x that of full fine-tuning
            cfg.lr = round(cfg.lr * 10, 12)
    if cfg.sft_steps is None:
        cfg.sft_steps = 1200 if tiny_fresh and cfg.algo == "grpo" else 0
    cfg.reward = cfg.reward or ("iou" if cfg.schedule == "raw-iou" else "threshold")
    if cfg.task == "classify":
        task = tasks.Classification(labels, cfg.knowledge, vlm.template, cfg.w_fmt, cfg.mfrs_weight,
                                    cfg.mfrs_decay, cfg.recite_weight)
    elif cfg.task == "ground-multi":
        task = tasks.MultiGrounding(vlm.template, vlm.coord, cfg.reward, cfg.w_fmt)
    else:
        task = tasks.Grounding(vlm.template, vlm.coord, cfg.reward, cfg.w_fmt, parse_box_scale(cfg.sft_box_scale))
    cfg.max_new_tokens = cfg.max_new_tokens or task.max_new_tokens(vlm.is_tiny)
    vlm.run_fields = {**task.fields(), "medloc_max_new_tokens": cfg.max_new_tokens}
    return task


def new_policy(cfg, device, labels):
    """(policy, task) of a new run: the starting model. A GRPO grounding run
    of the built-in tiny model starts from its shipped SFT warm start unless --init or
    --sft-steps says otherwise (--sft-steps N: N SFT steps from random weights here)."""
    if cfg.model == "tiny" and cfg.init is None and cfg.sft_steps is None and cfg.algo == "grpo" and cfg.task == "ground":
        cfg.init, cfg.sft_steps = TINY_WARM_START, 0
    policy = load_policy(cfg, cfg.init or cfg.model, device)
    if cfg.task != "classify" and getattr(policy.model.config, "medloc_task", "ground") == "classify":
        raise RunError(f"{cfg.init or cfg.model} is a classification model (trained with --task classify); "
                       "a grounding run starts from a grounding model, or from --model")
    if cfg.lora_rank:  # a --lora-targets that matches nothing is said now, not after the warm start
        try:
            lora.targets_of(policy.model, cfg.lora_targets or lora.DEFAULT_TARGETS)
        except ValueError as e:
            raise RunError(str(e))
    return policy, settle(cfg, policy, labels)


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


def optimizer_of(cfg, policy):
    """AdamW over the trainable parameters (METHOD.md 5.6), in one fused kernel per dtype and device
    (torch's fused AdamW, CPU and CUDA): one pass over weights, gradients and moments, where the
    default is a Python loop of small kernels per tensor on the CPU (7x the time for the proxy's
    123 M parameters) and several passes on CUDA (foreach). The output layer, which --fsdp leaves
    whole (dist.shard), is a parameter group of its own in every run: a fused kernel takes split
    and whole tensors only apart, and checkpoints keep one layout with and without --fsdp."""
    params = dist.trainable(policy.model)
    head = [p for p in params if p is policy.model.lm_head.weight]  # none with LoRA (a frozen head)
    body = [p for p in params if p is not policy.model.lm_head.weight]
    groups = [{"params": group} for group in (body, head) if group]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True), body + head


def regrouped(state, optimizer, params):
    """An optimizer state saved with all parameters in one group (`params`' order: before the
    output layer had a group of its own), in the optimizer's groups."""
    if len(state["param_groups"]) == len(optimizer.param_groups):
        return state
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    new = [index[id(p)] for p in params]  # saved index -> today's
    groups = [{**state["param_groups"][0], "params": [index[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    return {"state": {new[i]: s for i, s in state["state"].items()}, "param_groups": groups}


# ----------------------------------------------------------------------------- new or resumed
def begin(cfg, run_dir, device, policy, task):
    """The rest of a new run once its policy is warm: adapters, config.json, reference, optimizer."""
    if cfg.lora_rank:  # after the warm start: the adapters learn the RL update only
        add_adapters(cfg, policy, run_dir)
    saved = {k: to_config_path(v, run_dir) if k in PATH_KEYS else v
             for k, v in dataclasses.asdict(cfg).items()}
    if dist.is_main():
        write_json(saved, os.path.join(run_dir, "config.json"))
    if dist.world() > 1:  # ranks draw different completions for their groups
        torch.manual_seed(cfg.seed + dist.rank())
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:
        ref_name = cfg.ref_model or cfg.init or cfg.model
        ref = reference(cfg, policy, ref_name, device, same=ref_name == (cfg.init or cfg.model))
    return Run(cfg, task, policy, ref, *optimizer_of(cfg, policy), make_run_schedule(cfg))


def reference(cfg, policy, name, device, same):
    """The frozen KL anchor (METHOD.md 5.3): a frozen copy of `policy` while that is still the
    starting model (`same`), else loaded from `name`. Under --fsdp it is always loaded, sharded
    like the policy (a sharded model cannot be copied whole)."""
    if cfg.fsdp:
        return load_policy(cfg, name, device).freeze()
    # loaded: frozen as it is, no copy (on resume the policy is the checkpoint, not the start)
    return policy.frozen_copy() if same else load_policy(cfg, name, device).freeze()


# what a reference must read as the policy does: the token ids, the vision tokens, the image patches
READ_ALIKE = ("model_type", "text_config.vocab_size", "image_token_id", "video_token_id", "vision_start_token_id",
              "vision_end_token_id", "vision_config.patch_size", "vision_config.spatial_merge_size",
              "vision_config.temporal_patch_size")


def check_models(cfg):
    """From the configs alone, before anything loads: the starting model is of a family this code
    trains (model.FAMILIES), and a --ref-model reads token ids and image patches as the policy does
    (a reference with another vocabulary would otherwise fail at its first forward, after the
    set-up and any warm start). Returns the starting model's (family, whether it is the tiny one)."""
    start, flag = cfg.init or cfg.model, "--init" if cfg.init else "--model"
    policy_config = None if start == "tiny" else config_of(start, flag)  # the built-in model is a Qwen2.5-VL
    problem = None if policy_config is None else unsupported(policy_config)
    if problem:
        raise RunError(f"{flag} {start}: {problem}")
    family = ("qwen2_5_vl", True) if policy_config is None else (policy_config.model_type,
                                                                  bool(getattr(policy_config, "medloc_tiny", False)))
    if cfg.ref_model in (None, "none"):
        return family
    policy_config, ref_config = policy_config or config_of(start, flag), config_of(cfg.ref_model, "--ref-model")
    for field in READ_ALIKE:
        mine, theirs = (functools.reduce(lambda c, key: getattr(c, key, None), field.split("."), config)
                        for config in (policy_config, ref_config))
        if mine != theirs:
            raise RunError(f"--ref-model {cfg.ref_model}: its {field} is {theirs!r}, the policy's ({start}) "
                           f"{mine!r}; the reference scores the policy's tokens and image patches, so both must "
                           "read them alike")
    return family


def config_of(name, flag):
    try:
        return load_vlm("tiny").model.config if name == "tiny" else model_config(name)
    except ValueError as e:
        raise RunError(f"{flag} {e}")


def add_adapters(cfg, policy, run_dir, folder=None):
    """LoRA adapters on the policy: fresh ones, or those saved in `folder` (a checkpoint's model/).
    Their base is the run's starting model; the random built-in tiny model is first saved in
    RUN/warmstart/model, so that the adapters name a folder that PEFT can load."""
    if not cfg.init and cfg.model == "tiny" and not folder:
        base = os.path.join(run_dir, "warmstart", "model")
        if dist.is_main():
            rundir.save_model(policy, base)
        dist.barrier()
        cfg.init = base
    start = cfg.init or cfg.model  # a folder by its absolute path, so the adapters load from anywhere
    policy.base_name = os.path.abspath(start) if os.path.isdir(start) else start
    try:
        if folder:
            lora.load(policy.model, folder)
        else:
            lora.inject(policy.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or lora.DEFAULT_TARGETS,
                        cfg.lora_dropout)
    except ValueError as e:  # a --lora-targets that matches nothing
        raise RunError(str(e))


def resume(cfg, run_dir, device, labels):
    """(Run, step) of the newest intact checkpoint; RNG restored, the log cut back to its step."""
    ckpt, state, skipped = rundir.latest_intact(run_dir)
    for reason in skipped:
        print(f"skipping a damaged checkpoint: {reason}")
    if ckpt is None:
        raise RunError(f"--resume {run_dir}: no intact checkpoint to resume from")
    last_output = "final" if default_eval_spec(cfg) == "none" else "eval.json"  # written after the last step
    finished = os.path.exists(os.path.join(run_dir, last_output))
    if cfg.steps < state["step"] or cfg.steps == state["step"] and finished:
        raise RunError(f"--resume {run_dir}: the run is at step {state['step']}; pass --steps above that")
    if cfg.steps == state["step"]:  # trained to the end, stopped before its evaluation: finish that
        print(f"{run_dir} trained all {cfg.steps} steps; finishing its final model and evaluation")
    shards = os.path.join(ckpt, "sharded") if os.path.isdir(os.path.join(ckpt, "sharded")) else None
    if cfg.lora_rank or shards:  # the run's starting model, split as this run splits it; then the checkpoint's
        policy = load_policy(cfg, cfg.init or cfg.model, device)
        if cfg.lora_rank:
            add_adapters(cfg, policy, run_dir, None if shards else os.path.join(ckpt, "model"))
    else:
        policy = load_policy(cfg, os.path.join(ckpt, "model"), device)
    with open(os.path.join(ckpt, "model", "config.json")) as f:
        saved = json.load(f).get("medloc_labels")
    if labels and saved and not labels.same_classes(labels_from_json(saved, os.path.join(ckpt, "model", "config.json"))):
        raise RunError(f"--resume {run_dir}: the run's classes were {[c['name'] for c in saved['classes']]}, "
                       f"its labels now give {labels.names}; resuming would change what every label means")
    task = settle(cfg, policy, labels)
    ref = None
    if cfg.algo == "grpo" and cfg.beta > 0:  # the starting policy, recorded in config.json
        ref = reference(cfg, policy, cfg.ref_model or cfg.init or cfg.model, device,
                        same=cfg.lora_rank and not cfg.ref_model)
    optimizer, params = optimizer_of(cfg, policy)
    if shards:  # weights and AdamW state, each rank reading the parts it keeps now
        dist.load_shards(policy.model, optimizer, shards)
    else:
        dist.load_optimizer_state(optimizer, regrouped(state["optimizer"], optimizer, dist.trainable(policy.model)))
    schedule = make_run_schedule(cfg)
    schedule.load_state_dict(state["schedule"])
    rngs = state["rng"]  # one per rank of the run that saved it
    rundir.set_rng_state(rngs[dist.rank() % len(rngs)])
    if dist.rank() >= len(rngs):  # more ranks than before: a stream of its own
        torch.manual_seed(cfg.seed + dist.rank() + state["step"])
    if dist.is_main():
        rundir.truncate_log(os.path.join(run_dir, "metrics.jsonl"), state["step"])
    print(f"resumed {run_dir} at step {state['step']} (tau {schedule.tau})")
    return Run(cfg, task, policy, ref, optimizer, params, schedule), state["step"]
