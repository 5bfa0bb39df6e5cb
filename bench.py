"""Time the GRPO step (METHOD.md section 5) and count the work it does, lean path vs naive path.

    python bench.py                         # tiny default, lean step only
    python bench.py --naive                 # + the straightforward step, interleaved, with ratios
    python bench.py --model proxy --naive   # random-init Qwen2.5-VL, 151,936 vocab, ~256 image tokens
    python bench.py --model clone --naive   # the output layer dominates: hidden 256, 2 layers, 12 image tokens
    python bench.py --model qwen3-clone --naive   # the same for Qwen3-VL (also qwen3-moe-clone)
    python bench.py --compile               # + the step with a compiled decoding step, interleaved
    python bench.py --model 3b              # Qwen2.5-VL-3B dimensions (random init; for a GPU)
    python bench.py --memory                # peak memory of one log-prob pass, each path in a fresh process
    python bench.py --head                  # the output layer's forward + backward, lean vs whole logits
    python bench.py --optimizer             # the fused AdamW step vs torch's per-tensor one
    python bench.py --memory-plan --model 3b [--fsdp K] [--lora-rank r]   # expected peak per phase
    python bench.py --memory-plan --model proxy --check                    # ... against a run on this CPU
    python bench.py --prepare 200 100000    # prepare.py: DICOM -> PNG images/s per worker, memory for 100k rows
    python bench.py --trackers --steps 20   # what --report-to tensorboard --log-samples-every 50 adds to a step
    python bench.py --gpu-check --out DIR   # the GPU path in one prepared command (gpu_check.py)

The lean step samples with the prompt prefilled once per group and scores each group in one row
(grpo.sample_groups, VLM.completion_logps); `--naive` runs the same step (train.grpo_step) with a
`Naive` policy (measure.py), which repeats every prompt G times through the vision encoder and the language
model when it prefills and when it scores, with full (N, T, vocab) logits. Completions always run
to --max-new-tokens (no stop token), so both paths do the same work whatever a random model samples.
This file is the command line; the shapes, the timers, the FLOPs and the memory plan are measure.py's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch allocates
import torch

import start
import trackers
import train
from config import Config
from data import load_dataset
from files import RunError, make_folder
from measure import (GiB, IMAGE_TOKENS, MEASURED_PHASES, PHASES, PROMPT_TEXT_TOKENS, SETTINGS, SHAPES, Naive, build,
                     cannot_fit, checkpoint_plan, matmul_rate, memory_plan, phase_peaks, phase_utilisation, plan_model,
                     reset_peak, resident, step_plan, step_runs, time_runs)
from model import OutputLayer, reuse_freed_memory

UTILISATION_TARGETS = {"proxy": 0.5}  # the lean step's FLOP rate over the square-matmul rate (1 thread, CPU)
# (model, path, against, phase, at most): the median of one path's phase over another's, interleaved
# in one run (1 thread, CPU): with --naive, the lean step against the straightforward one; with
# --compile, the rollout with a compiled decoding step against the eager one.
RATIO_TARGETS = [("clone", "lean", "naive", "total", 0.8), ("tiny", "compiled", "lean", "rollout", 0.6)]


def tracker_overhead(results, every):
    """The trackers' share of the step: the record per step plus the samples once every `every` steps."""
    med = {k: statistics.median(r[k] for r in results) for k in ("total", "tracker_log", "tracker_samples")}
    added = med["tracker_log"] + med["tracker_samples"] / every
    return (f"--report-to tensorboard --log-samples-every {every}: {med['tracker_log'] * 1e3:.1f} ms per step for the "
            f"record, {med['tracker_samples'] * 1e3:.0f} ms per sampled-completion log; {added * 1e3:.1f} ms per step "
            f"on a {med['total']:.3f} s step: {added / med['total']:.2%} (target under 2 %: "
            f"{'met' if added / med['total'] < 0.02 else 'NOT met'})")


def run_bench(a):
    reuse_freed_memory()  # as train.py runs
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    s = SETTINGS[a.model]
    B, G, new = a.batch_prompts or s["B"], a.group_size or s["G"], a.max_new_tokens or s["new"]
    image_tokens = a.image_tokens or s.get("image_tokens", IMAGE_TOKENS)
    paths = [p for p in ("naive", "compiled") if getattr(a, "compile" if p == "compiled" else p)]
    problem = cannot_fit(a.model, step_plan(a.model, device, a.precision, B, G, new, image_tokens), device)
    if problem:  # said before anything is built: an allocator's traceback says none of this
        raise SystemExit(f"bench.py --model {a.model}: {problem}; `--memory-plan` shows its terms")
    policy, task, runs, counter = step_runs(a.model, device, a.precision, B, G, new, image_tokens, paths,
                                            meta=device == "cuda")
    tracker = trackers.Trackers(["tensorboard"], tempfile.mkdtemp(), 0, {}) if a.trackers else None
    results, first, samples = time_runs(runs, counter, B, a.steps, a.warmup, tracker)
    print(f"{a.model} on {device}, {torch.get_num_threads()} thread(s): B={B}, G={G}, {new} new tokens, "
          f"micro-batch {s['micro'] or B * G}, median of {a.steps} steps after {a.warmup} warm-up")
    print(table(results))
    if a.compile:  # the first compiled rollout compiles: what it took beyond a compiled rollout's median
        print(f"compilation: {first['compiled'] - statistics.median(r['rollout'] for r in results['compiled']):.1f} s "
              "(the first rollout's time beyond the median)")
    print(targets(a.model, results))
    if tracker:
        print(tracker_overhead(results["lean"], a.trackers))
    print(utilisation(policy, samples, task, results["lean"], device, B, G, new, a.model))
    return results


def targets(name, results):
    """RATIO_TARGETS of this model among the paths that ran: met or not."""
    lines = []
    for model, path, against, phase, most in RATIO_TARGETS:
        if model == name and path in results and against in results:
            ratio = statistics.median(r[phase] for r in results[path]) / \
                statistics.median(r[phase] for r in results[against])
            lines.append(f"target: the {path} {phase} at most {most}x the {against} one: {ratio:.2f}x, "
                         f"{'met' if ratio <= most else 'NOT met'}")
    return "\n".join(lines)


def utilisation(policy, samples, task, results, device, B, G, new, name):
    """The lean step's FLOPs per phase over its median time, as a share of this device's
    square-matmul rate in the weights' dtype (or bf16 under autocast)."""
    rate = matmul_rate(device, policy.amp_dtype or next(policy.model.parameters()).dtype)
    rows = phase_utilisation(policy, samples, task, results, B, G, new, rate)
    lines = [f"matmul rate {rate / 1e9:.1f} GFLOP/s; the lean step's FLOPs (measure.step_flops) per median second:",
             "| phase | GFLOP | GFLOP/s | utilisation |", "|---|---|---|---|"]
    lines += [f"| {phase} | {r['gflop']:.2f} | {r['gflop_per_s']:.1f} | {r['utilisation']:.0%} |" for phase, r in rows.items()]
    if name in UTILISATION_TARGETS:
        target, share = UTILISATION_TARGETS[name], rows["step"]["utilisation"]
        verdict = "met" if share >= target else "NOT met"
        lines.append(f"target: the step at >= {target:.0%} of the matmul rate: {verdict}")
    return "\n".join(lines)


def table(results):
    """Medians per phase of each path, and each other path over the lean one."""
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    cols, others = list(med), [c for c in med if c != "lean"]
    lines = ["| " + " | ".join([f"{'':<22}"] + [f"{c:>10}" for c in cols] + [f"{c} / lean" for c in others]) + " |",
             "|" + "---|" * (1 + len(cols) + len(others))]
    for label, key, fmt in [(f"{p} s", p, "{:.3f}") for p in PHASES + ("total",)] + [
            ("completions / s", "completions", "{:.1f}"), ("tokens / s", "tokens", "{:.1f}"),
            ("vision images / step", "images", "{:.0f}"), ("prompt tokens / step", "prompt_tokens", "{:.0f}"),
            ("peak GiB (CUDA)", "peak_gib", "{:.2f}")]:
        per_second = label.endswith("/ s")  # counts over the step's time
        vals = {c: med[c][key] / med[c]["total"] if per_second else med[c][key] for c in cols}
        ratios = [vals[c] / vals["lean"] if vals["lean"] else float("nan") for c in others]
        lines.append("| " + " | ".join([f"{label:<22}"] + [f"{fmt.format(vals[c]):>10}" for c in cols]
                                       + [f"{r:.2f}" for r in ratios]) + " |")
    return "\n".join(lines)


def probe_memory(a):
    """Fresh process: peak RSS growth of one log-prob forward + backward, 8 x 128 tokens, either
    the whole pass (model included) or the log-prob head alone (final hidden states -> log-probs)."""
    torch.manual_seed(0)
    policy = build("proxy", "cpu", "fp32")
    ids = torch.randint(200, 151_936, (8, 128))
    objective = lambda logp, start, stop: logp  # noqa: E731  (the sum of the log-probs)
    if a.probe.endswith("head"):
        hidden = torch.randn(8 * 128, policy.model.lm_head.in_features, requires_grad=True)
        base = resident("VmRSS")
        if a.probe == "lean-head":
            OutputLayer.apply(hidden, policy.model.lm_head.weight, ids.flatten(), policy, 1.0, True, objective)[0].backward()
        else:
            logits = policy.model.lm_head(hidden).view(8, 128, -1)
            policy.policy_logprobs(logits, 1.0).gather(-1, ids[..., None]).sum().backward()
    else:
        data = load_dataset("synth:mix")
        batch = policy.encode([data[0].image(), data[1].image()], [data[0].query, data[1].query])
        base = resident("VmRSS")
        scorer = Naive.of(policy) if a.probe == "naive-pass" else policy
        scorer.completion_loss(batch, ids, objective)[0].backward()
    print(json.dumps({"probe": a.probe, "extra_gib": (resident("VmHWM") - base) / GiB}))


def run_memory():
    out = {}
    for probe in PROBES:
        res = subprocess.run([sys.executable, __file__, "--probe", probe], capture_output=True, text=True, check=True)
        out[probe] = json.loads(res.stdout.strip().splitlines()[-1])["extra_gib"]
    print("peak memory over the loaded model (GiB), proxy model (151,936 vocab), 8 sequences x 128 tokens,")
    print("fp32, forward + backward, each in a fresh process (peak RSS):")
    print("| part | lean | naive | lean / naive |\n|---|---|---|---|")
    for part in ("head", "pass"):
        lean, naive = out[f"lean-{part}"], out[f"naive-{part}"]
        label = "log-prob head (hidden states -> log-probs)" if part == "head" else "whole log-prob pass"
        print(f"| {label} | {lean:.2f} | {naive:.2f} | {lean / naive:.2f} |")


def time_head(steps=5):
    """Seconds of a weighted sum of log-probs through the proxy's output layer (1,024 positions,
    151,936 tokens), forward and backward: the lean chunks (model.OutputLayer, the gradient taken
    in the forward) and the whole (1024, vocab) logits through autograd, interleaved; medians of
    `steps` after one warm-up each."""
    policy = build("proxy", "cpu", "fp32")
    weight = policy.model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1024, weight.shape[1], generator=g)
    targets, upstream = torch.randint(200, weight.shape[0], (1024,), generator=g), torch.randn(1024, generator=g)

    def lean(h):
        return OutputLayer.apply(h, weight, targets, policy, 0.9, True, lambda logp, s, e: upstream[s:e] * logp)[0]

    def naive(h):
        logp = policy.policy_logprobs(policy.model.lm_head(h), 0.9).gather(-1, targets[:, None])[:, 0]
        return (logp * upstream).sum()
    paths = {"lean": lean, "naive": naive}
    times = {name: [] for name in paths}
    for i in range(steps + 1):
        for name, path in paths.items():
            weight.grad = None
            h = hidden.clone().requires_grad_()
            t0 = time.perf_counter()
            path(h).backward()
            if i:
                times[name].append(time.perf_counter() - t0)
    lean, naive_s = statistics.median(times["lean"]), statistics.median(times["naive"])
    print(f"output layer, forward + backward of 1,024 positions, {torch.get_num_threads()} thread(s), "
          f"median of {steps}: lean {lean:.2f} s, whole logits {naive_s:.2f} s, lean / whole {lean / naive_s:.2f}")


def time_optimizer(steps=5):
    """Seconds of one AdamW step over the proxy's 123 M parameters: torch's fused kernel, as
    start.optimizer_of builds it, against its per-tensor loop (the CPU default), interleaved;
    medians of `steps` after one warm-up each. tests/test_train.py checks they step alike."""
    policy = build("proxy", "cpu", "fp32")
    params = list(policy.model.parameters())
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    paths = {"fused": start.optimizer_of(Config(lr=1e-6), policy)[0],
             "per-tensor": torch.optim.AdamW(params, lr=1e-6, foreach=False)}
    times = {name: [] for name in paths}
    for i in range(steps + 1):
        for name, optimizer in paths.items():
            t0 = time.perf_counter()
            optimizer.step()
            if i:
                times[name].append(time.perf_counter() - t0)
    fused, loop = statistics.median(times["fused"]), statistics.median(times["per-tensor"])
    print(f"AdamW step over the proxy's parameters, {torch.get_num_threads()} thread(s), median of {steps}: "
          f"fused {fused:.3f} s, per-tensor {loop:.3f} s, fused / per-tensor {fused / loop:.2f}")


PROBES = ("lean-head", "naive-head", "lean-pass", "naive-pass")


def print_plan(plan, title):
    print(title)
    print("| phase | peak GiB | largest terms (GiB) |\n|---|---|---|")
    for phase, terms in plan.items():
        top = sorted(terms.items(), key=lambda kv: -kv[1])[:5]
        print(f"| {phase} | {sum(terms.values()) / GiB:.2f} | "
              + ", ".join(f"{k} {v / GiB:.2f}" for k, v in top if v) + " |")


def prepare_run(argv):
    """One prepare.py conversion in this process: seconds, resident memory before it (the imports),
    this process's peak and its workers' largest peak, in bytes."""
    import resource
    import prepare
    before = resident("VmRSS")
    t = time.perf_counter()
    prepare.main(argv)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "before": before, "peak": resident("VmHWM"),
            "worker_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def time_prepare(n_images, n_rows, rounds=3):
    """prepare.py on made-up RSNA-style sets (docs/data.md): 1024 x 1024 16-bit DICOMs -> PNG per
    second with 1 and 2 workers (runs interleaved, medians), then the peak memory of converting
    n_rows rows, each its own small PNG, against a tenth of them (flat memory: rows streamed)."""
    import numpy as np
    from PIL import Image
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from dicom_files import write_dicom
    work = tempfile.mkdtemp(prefix="bench-prepare-")

    pixels = np.random.default_rng(0).integers(0, 4096, (1024, 1024), dtype=np.uint16)
    folder = os.path.join(work, "dicom")
    with open(os.path.join(work, "dicom.csv"), "w") as f:  # RSNA's layout: 1024 x 1024 DICOMs
        f.write("patientId,x,y,width,height,Target\n")
        for i in range(n_images):
            write_dicom(os.path.join(folder, f"p{i:06d}.dcm"), pixels, WindowCenter="2048", WindowWidth="4096")
            f.write(f"p{i:06d},10,20,30,40,1\n")
    dicoms = [os.path.join(work, "dicom.csv"), "--images", folder, "--quiet"]
    times = {1: [], 2: []}
    for r in range(rounds):
        for w in times:
            out = os.path.join(work, f"out-{w}-{r}")
            got = measure_prepare(["rsna"] + dicoms + ["--workers", str(w), "--out", out])
            times[w].append(got["seconds"])
    for w, ts in times.items():
        rate = n_images / statistics.median(ts)
        print(f"1024x1024 16-bit DICOM -> PNG, {w} worker(s): {rate:.1f} images/s ({rate / w:.1f} per worker), "
              f"runs {', '.join(f'{t:.1f}' for t in ts)} s")
    for n in (n_rows // 10, n_rows):  # VinDr's layout, whose images may have any size
        folder = os.path.join(work, f"rows{n}")
        os.makedirs(folder)
        with open(os.path.join(work, f"rows{n}.csv"), "w") as f:
            f.write("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
            for i in range(n):
                Image.new("L", (64, 64)).save(os.path.join(folder, f"i{i:06d}.png"))
                f.write(f"i{i:06d},Nodule/Mass,8,R{i % 3},10,20,30,40\n")
        small = [os.path.join(work, f"rows{n}.csv"), "--images", folder, "--quiet"]
        got = measure_prepare(["vindr"] + small + ["--workers", "2", "--out", os.path.join(work, f"out-rows{n}")])
        print(f"{n:,} rows: {got['seconds']:.0f} s, resident {got['before'] / 2**20:.0f} MiB after the imports, "
              f"peak {got['peak'] / 2**20:.0f} MiB (main), {got['worker_peak'] / 2**20:.0f} MiB (largest worker)")
    subprocess.run(["rm", "-rf", work])


def measure_prepare(argv):
    """prepare_run in a fresh process, so that each conversion's peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "--measure-prepare", json.dumps(argv)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured_run(model, size):
    """A real run's set-up and two GRPO steps on the CPU (train.train_step, as train.py runs
    them): the peak resident memory each phase adds to the process before the model was loaded,
    set-up over the first step and the phases of the second (the steady state)."""
    shape = dict(batch_prompts=size["B"], group_size=size["G"], max_new_tokens=size["new"], micro_batch=size["micro"])
    if model == "tiny":
        cfg = Config(eval_dataset="none", steps=2, **shape)
    else:
        pixels = IMAGE_TOKENS * 28 * 28
        cfg = Config(model=model, eval_dataset="none", steps=2, sft_steps=0, min_pixels=pixels, max_pixels=pixels,
                     lr=1e-6, **shape)
    train_set, _, _, labels = start.load_data(cfg)
    base = resident("VmRSS")
    reset_peak()
    policy, task = start.new_policy(cfg, "cpu", labels)
    run = start.begin(cfg, tempfile.mkdtemp(), "cpu", policy, task)
    peaks = {"set-up": resident("VmHWM") - base}
    with phase_peaks(peaks, reset_peak, lambda: resident("VmHWM") - base):
        for step in (1, 2):
            for phase in MEASURED_PHASES.values():
                peaks.pop(phase, None)
            train.train_step(run, train_set, step)
    sample = train_set[0]
    prompt = policy.encode([sample.image()], [task.prompt(sample)])
    return {"peaks": peaks, "base": base, "prompt_tokens": prompt["input_ids"].shape[1],
            "image_tokens": int(prompt["image_grid_thw"].prod()) // 4, "cfg": vars(cfg)}


def check_plan(model, size=None):
    """The plan against a measured run of `model` (tiny or proxy; `size`: B, G, new tokens and
    micro-batch, default SETTINGS) on this CPU, in a fresh process in which glibc hands freed
    blocks back at once, so that resident memory follows the live tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        name = model
        if model == "proxy":
            name = os.path.join(tmp, "proxy")
            build("proxy", "cpu", "fp32").save(name)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        size = json.dumps(size or SETTINGS[model])
        res = subprocess.run([sys.executable, __file__, "--measure-run", name, size], capture_output=True,
                             text=True, env=env, check=True)
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = Config(**measured["cfg"])
    plan = memory_plan(plan_model(model), cfg, measured["prompt_tokens"], measured["image_tokens"], device="cpu")
    rows = {}
    for phase, terms in plan.items():
        expected, got = sum(terms.values()), measured["peaks"][phase]
        rows[phase] = {"plan": expected, "measured": got, "base": measured["base"]}
    return rows


def print_check(model, rows):
    print(f"{model} on this CPU (fp32, 1 thread), memory over the process before the model was loaded (GiB):")
    print("| phase | plan | measured | plan / measured | with the process's own (total) |\n|---|---|---|---|---|")
    for phase, r in rows.items():
        total = (r["plan"] + r["base"]) / (r["measured"] + r["base"])
        print(f"| {phase} | {r['plan'] / GiB:.3f} | {r['measured'] / GiB:.3f} | {r['plan'] / r['measured']:.2f} "
              f"| {total:.2f} |")


def show_plan(a, p):
    if a.check:
        if a.model not in ("tiny", "proxy"):
            p.error(f"--check measures a run on this CPU: --model tiny or proxy, not {a.model}")
        rows = check_plan(a.model)
        print_check(a.model, rows)
        return rows
    if a.fsdp and a.lora_rank:
        p.error("--fsdp with --lora-rank: train.py refuses that pair (the LoRA base fits each GPU)")
    if a.shard_size and (not a.fsdp or a.fsdp % a.shard_size):
        p.error(f"--shard-size {a.shard_size}: with --fsdp K, a divisor of K (hybrid sharding)")
    device = "cpu" if a.model in ("tiny", "proxy") else "cuda"
    s = SETTINGS[a.model]
    ranks = a.fsdp or a.ranks
    checkpointing = (a.gradient_checkpointing or ("on" if device == "cuda" else "off")) == "on"
    cfg = Config(batch_prompts=(a.batch_prompts or s["B"]) * ranks, group_size=a.group_size or s["G"],
                 max_new_tokens=a.max_new_tokens or s["new"], micro_batch=s["micro"], lora_rank=a.lora_rank,
                 precision=a.precision, gradient_checkpointing=checkpointing)
    image = 16 if a.model == "tiny" else SHAPES[a.model].get("image_tokens", IMAGE_TOKENS)
    model = plan_model(a.model, a.lora_rank)
    plan = memory_plan(model, cfg, image + PROMPT_TEXT_TOKENS, image, ranks, bool(a.fsdp), device, a.shard_size or None)
    how = f"--fsdp over {a.fsdp} processes" if a.fsdp else f"{ranks} data-parallel process(es)"
    if a.shard_size:
        how = f"--fsdp hybrid over {a.fsdp} processes, each copy split over {a.shard_size}"
    print_plan(plan, f"{a.model}, {how}{f', LoRA r={a.lora_rank}' if a.lora_rank else ''}, {device}, "
                     f"precision {a.precision}, per process: {cfg.batch_prompts // ranks} prompts x "
                     f"{cfg.group_size} completions x {cfg.max_new_tokens} tokens, {image} image tokens, micro-batch "
                     f"{cfg.micro_batch or 'all'}, gradient checkpointing {'on' if checkpointing else 'off'}")
    print("| checkpoint write | host GiB (busiest process) | device GiB beyond the step |\n|---|---|---|")
    for layout, m in checkpoint_plan(model, cfg, ranks, bool(a.fsdp), a.shard_size or None, device).items():
        print(f"| {layout} | {m['host'] / GiB:.1f} | {m['device'] / GiB:.2f} |")
    return plan


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", *SHAPES),
                   help="tiny, a benchmark shape (proxy, clone, qwen3-clone, qwen3-moe-clone, qwen3.5-clone, "
                        "gemma3-clone, smolvlm-clone) or a real model's dimensions for --memory-plan (3b, 7b, 32b: "
                        "Qwen2.5-VL; qwen3-vl-4b/8b/32b/30b-a3b; qwen3.5-9b; medgemma-4b/27b; smolvlm2-2.2b)")
    p.add_argument("--naive", action="store_true", help="also time the straightforward step, interleaved")
    p.add_argument("--compile", action="store_true", help="also time the step with a compiled decoding step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    p.add_argument("--batch-prompts", type=int, default=None, help="B (default: 4)")
    p.add_argument("--group-size", type=int, default=None, help="G (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 tiny, 128 proxy, 256 3b")
    p.add_argument("--image-tokens", type=int, default=None,
                   help=f"merged tokens per image, models other than tiny (default {IMAGE_TOKENS}; clone 12)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "bf16-mixed"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 for comparable timings)")
    p.add_argument("--memory", action="store_true", help="peak memory of one log-prob pass, lean vs naive")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    p.add_argument("--head", action="store_true",
                   help="time the output layer's forward + backward, lean chunks vs whole logits (proxy)")
    p.add_argument("--optimizer", action="store_true", help="time the fused AdamW step against the per-tensor one (proxy)")
    p.add_argument("--memory-plan", action="store_true",
                   help="expected peak memory per process at set-up, sampling, scoring and update, from the shapes")
    p.add_argument("--fsdp", type=int, default=0, metavar="K", help="memory plan: split over K processes (--fsdp)")
    p.add_argument("--ranks", type=int, default=1, metavar="K", help="memory plan: K data-parallel processes")
    p.add_argument("--shard-size", type=int, default=0, metavar="K",
                   help="memory plan with --fsdp: hybrid sharding, each copy split over K processes (a node's)")
    p.add_argument("--lora-rank", type=int, default=0, help="memory plan: LoRA adapters of this rank")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default=None,
                   help="memory plan: default on for 3b/7b, off for tiny/proxy (as bench and a CPU run use them)")
    p.add_argument("--check", action="store_true",
                   help="memory plan of tiny or proxy against a measured run on this CPU")
    p.add_argument("--measure-run", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--prepare", nargs=2, type=int, metavar=("IMAGES", "ROWS"),
                   help="prepare.py: DICOM -> PNG images/s with 1 and 2 workers, and peak memory for ROWS rows")
    p.add_argument("--measure-prepare", help=argparse.SUPPRESS)
    p.add_argument("--gpu-check", action="store_true",
                   help="the GPU check (gpu_check.py): writes --out/gpu_check.json and .md; --quick: small shapes")
    p.add_argument("--out", default="gpu-check", help="--gpu-check: the folder it writes")
    p.add_argument("--quick", action="store_true", help="--gpu-check: small shapes and few steps (the suite runs it on CPU)")
    p.add_argument("--trackers", type=int, nargs="?", const=50, default=0, metavar="EVERY",
                   help="also time --report-to tensorboard's work per step, samples every EVERY steps (default 50)")
    a = p.parse_args(argv)
    lowest = {"steps": 1, "warmup": 0, "batch_prompts": 1, "group_size": 2, "max_new_tokens": 1, "threads": 1,
              "image_tokens": 1,
              "fsdp": 0, "ranks": 1, "lora_rank": 0, "trackers": 0, "shard_size": 0}
    for name, lo in lowest.items():  # a group of one has no advantage (its std is undefined)
        if getattr(a, name) is not None and getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least {lo}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if a.gpu_check:
        try:  # a file there, under a file, or a read-only disk: one line before the check starts
            make_folder(a.out)
        except RunError as e:
            p.error(f"{e} (the check writes gpu_check.json and .md into it)")
        import gpu_check
        return gpu_check.run_check(a.out, a.device, a.quick)
    torch.set_num_threads(a.threads)
    if a.probe:
        return probe_memory(a)
    if a.memory:
        return run_memory()
    if a.head:
        return time_head(a.steps)
    if a.optimizer:
        return time_optimizer(a.steps)
    if a.measure_run:
        print(json.dumps(measured_run(a.measure_run[0], json.loads(a.measure_run[1]))))
        return None
    if a.measure_prepare:
        print(json.dumps(prepare_run(json.loads(a.measure_prepare))))
        return None
    if a.prepare:
        return time_prepare(*a.prepare)
    if a.image_tokens and "image_tokens" in SHAPES.get(a.model, {}):
        p.error(f"--image-tokens: {a.model} resizes every image to one size, and its config sets its "
                f"{SHAPES[a.model]['image_tokens']} tokens")
    if a.memory_plan:
        return show_plan(a, p)
    return run_bench(a)


if __name__ == "__main__":
    main()
