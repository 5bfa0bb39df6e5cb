"""The GPU check: the GPU path measured in one prepared command (docs/step.md, "On a GPU").

    python bench.py --gpu-check --out DIR                        # a GPU node: under 8 minutes on one H200
    python bench.py --gpu-check --device cpu --quick --out DIR   # the same parts, small, on a CPU (the suite runs it)

It writes DIR/gpu_check.json and DIR/gpu_check.md, one entry per part:

  stack        the device and its memory, the torch / transformers / CUDA versions, the square-matmul
               rate in the compute dtype (bf16 on CUDA): the denominator of every utilisation figure
  cuda_tests   `pytest -m cuda` (tests/test_cuda.py and the tests marked cuda elsewhere) and its result
  default_run  the default run's first 20 GRPO steps in --precision bf16-mixed: every number finite, the
               reference's KL exactly 0 at step 1, and tau step by step against the same steps on the CPU
  steps        the step by phase (rollout, reference, policy, backward, optimizer) with its FLOPs and
               utilisation, and each phase's peak memory against the memory plan's: the tiny model, the
               123 M proxy and the 3B shape (real widths, layers and vocabulary, built on the meta device,
               materialised in bf16 on the GPU), eager and compiled, LoRA r = 64 on the 3B shape, and the
               Qwen3-VL-4B and MedGemma-4B shapes (eager) when the budget leaves time for them

Every part is guarded: one that fails is recorded with its error and the others still run. A shape
whose memory plan does not fit the device's free memory is recorded as skipped with that line,
before anything of it is built. Nothing here downloads anything.
"""
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

import torch
import transformers

import measure
from files import first_line
from model import reuse_freed_memory

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUN_STEPS = 20
# (shape, path, LoRA rank, precision, B, G, new tokens): what the steps part times, in this order
FULL_STEPS = [("tiny", "compiled", 0, "auto", 4, 8, 24), ("proxy", "compiled", 0, "auto", 4, 8, 128),
              ("3b", "compiled", 0, "bf16", 4, 8, 128), ("3b", "lora", 64, "bf16", 4, 8, 128),
              # the families of 2026 at their 4B shapes, eager (their compiled decoding is untried on a GPU)
              ("qwen3-vl-4b", "eager", 0, "bf16", 4, 8, 128), ("medgemma-4b", "eager", 0, "bf16", 4, 8, 128)]
QUICK_STEPS = [("tiny", "eager", 0, "auto", 2, 4, 8)]
BUDGET_SECONDS = 450  # the parts still to run when this is spent are skipped: the check ends within 8 minutes


def status_of(e):
    """An exception as the one line a part records."""
    return f"{type(e).__name__}: {first_line(e)}"


def guarded(name, part, *args):
    """part(*args) as a dict with its status ('ok' unless the part says otherwise) and seconds; an
    error in it is recorded (its line and traceback's end), and memory it held is given back."""
    t0 = time.time()
    try:
        out = {"status": "ok", **part(*args)}
    except Exception as e:  # noqa: BLE001 - a failed part is a result, not the end of the check
        out = {"status": f"failed: {status_of(e)}", "traceback": traceback.format_exc()[-3000:]}
    free_device_memory()
    out["seconds"] = round(time.time() - t0, 1)
    print(f"gpu check: {name}: {out['status']} ({out['seconds']} s)", flush=True)
    return out


def free_device_memory():
    """What the last part held, given back: a compiled decoding step's cache keeps its model alive."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the parts
def stack(device):
    """What the numbers were measured on."""
    out = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(name=props.name, memory_gib=props.total_memory / measure.GiB, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(), devices=torch.cuda.device_count())
        dtype = torch.bfloat16
    else:
        total = measure.proc_bytes("/proc/meminfo", "MemTotal")
        out.update(name=platform.processor() or platform.machine(), memory_gib=total / measure.GiB, cores=os.cpu_count(),
                   threads=torch.get_num_threads())
        dtype = torch.float32  # what a CPU run computes in
    out["free_gib"] = measure.free_bytes(device) / measure.GiB
    out["matmul_dtype"] = str(dtype).removeprefix("torch.")
    out["matmul_tflops"] = measure.matmul_rate(device, dtype) / 1e12
    return out


def cuda_tests(device, timeout):
    """`pytest -m cuda` in its own process: counts of passed, failed, skipped, and its last lines."""
    if device != "cuda":
        return {"status": "skipped: no CUDA" if not torch.cuda.is_available() else "skipped: --device cpu"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           os.path.join(HERE, "tests")], capture_output=True, text=True, cwd=HERE, timeout=timeout)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    status = "ok" if done.returncode == 0 and counts.get("passed", 0) else f"failed: {summary or done.stderr[-300:]}"
    return {"status": status, "passed": counts.get("passed", 0), "failed": failed, "skipped": counts.get("skipped", 0),
            "summary": summary, "tail": done.stdout[-2000:]}


def train_run(out, flags, timeout):
    """`python train.py FLAGS --out OUT` in its own process: its metrics.jsonl records."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *flags, "--out", out], capture_output=True,
                          text=True, cwd=HERE, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"train.py {' '.join(flags)}: exit status {done.returncode}: "
                           + (done.stderr.strip().splitlines() or ["no output"])[-1])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def records_finite(records):
    return all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, (int, float)))


def default_run(device, out_dir, steps, timeout):
    """`python train.py --steps N --precision bf16-mixed` on the device (the shipped warm start, the
    MedLoc-R1 schedule), and the same steps on the CPU in fp32: tau's decisions compared step by step."""
    common = ["--steps", str(steps), "--eval-dataset", "none", "--save-every", str(steps)]
    run = train_run(os.path.join(out_dir, f"default-{device}"), common + ["--device", device, "--precision", "bf16-mixed"],
                    timeout)
    cpu = train_run(os.path.join(out_dir, "default-cpu-fp32"), common + ["--device", "cpu", "--precision", "fp32"], timeout)
    taus, cpu_taus = [r["tau"] for r in run], [r["tau"] for r in cpu]
    differ = [r["step"] for r, t in zip(run, cpu_taus) if r["tau"] != t]
    out = {"steps": len(run), "finite": records_finite(run), "kl_step1": run[0]["kl"], "taus": taus, "cpu_taus": cpu_taus,
           "same_taus": not differ, "first_tau_difference": differ[0] if differ else None,
           "reward_mean": [r["reward_mean"] for r in run], "cpu_reward_mean": [r["reward_mean"] for r in cpu],
           "step_seconds_median": statistics.median(r["step_seconds"] for r in run),
           "cpu_step_seconds_median": statistics.median(r["step_seconds"] for r in cpu)}
    problems = [p for p, bad in (("a number is not finite", not out["finite"]),
                                 (f"KL at step 1 is {out['kl_step1']}, not 0", out["kl_step1"] != 0.0)) if bad]
    if problems:
        out["status"] = "failed: " + "; ".join(problems)
    return out


@contextlib.contextmanager
def phase_memory(device, peaks):
    """Each timed phase's peak memory into `peaks` (measure.phase_peaks): CUDA's allocated bytes, or on
    the CPU this process's resident bytes over what it held when the block began. Yields the
    reader of the peak since the last reset (the set-up's, before the first phase)."""
    if device == "cuda":
        reset, peak = torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated
    else:
        base = measure.resident("VmRSS")
        reset, peak = measure.reset_peak, lambda: measure.resident("VmHWM") - base
    reset()
    with measure.phase_peaks(peaks, reset, peak):
        yield peak


def step_row(device, shape, path, lora_rank, precision, B, G, new, steps, warmup):
    """One shape's step timed by phase (eager, and compiled when `path` is "compiled", interleaved),
    its FLOPs and utilisation, and each phase's peak memory over the memory plan's."""
    image_tokens = measure.SETTINGS[shape].get("image_tokens", measure.IMAGE_TOKENS)
    plan = measure.step_plan(shape, device, precision, B, G, new, image_tokens, lora_rank)
    problem = measure.cannot_fit(shape, plan, device)
    if problem:
        return {"status": f"skipped: {problem}"}
    peaks = {}
    with phase_memory(device, peaks) as peak:
        policy, task, runs, counter = measure.step_runs(shape, device, precision, B, G, new, image_tokens,
                                                      ("compiled",) if path == "compiled" else (), lora_rank,
                                                      meta=shape != "tiny")
        peaks["set-up"] = peak()
        results, first, samples = measure.time_runs(runs, counter, B, steps, warmup)
    dtype = policy.amp_dtype or next(policy.model.parameters()).dtype
    rate = measure.matmul_rate(device, dtype)
    out = {"B": B, "G": G, "new_tokens": new, "precision": precision, "lora_rank": lora_rank, "steps": steps,
           "matmul_tflops": rate / 1e12, "paths": {}}
    for name, rows in results.items():
        out["paths"][name] = {**{p: statistics.median(r[p] for r in rows) for p in measure.PHASES + ("total",)},
                              "utilisation": measure.phase_utilisation(policy, samples, task, rows, B, G, new, rate)}
    if "compiled" in first:
        out["compilation_seconds"] = first["compiled"] - out["paths"]["compiled"]["rollout"]
    planned = {phase: sum(terms.values()) for phase, terms in plan.items()}
    out["memory_gib"] = {phase: {"measured": peaks[phase] / measure.GiB, "plan": planned[phase] / measure.GiB,
                                 "measured_over_plan": peaks[phase] / planned[phase]}
                         for phase in planned if peaks.get(phase)}
    del policy, task, runs, counter
    return out


def steps_part(device, rows, steps, warmup, deadline):
    out = {}
    for shape, path, lora_rank, precision, B, G, new in rows:
        name = f"{shape} {path}" + (f" r={lora_rank}" if lora_rank else "")
        if time.time() > deadline:
            out[name] = {"status": "skipped: the check's time budget is spent"}
            continue
        out[name] = guarded(f"steps {name}", step_row, device, shape, path, lora_rank, precision, B, G, new,
                            steps, warmup)
    failed = [n for n, r in out.items() if r["status"].startswith("failed")]
    return {"rows": out, **({"status": f"failed: {', '.join(failed)}"} if failed else {})}


# ----------------------------------------------------------------------------- the report
def markdown(report):
    """gpu_check.md: the stack, then each part's verdict and numbers as tables."""
    parts, s = report["parts"], report["parts"]["stack"]
    lines = [f"# GPU check: {s.get('name', '?')} ({report['device']})", "",
             f"`{report['command']}`: {report['seconds']:.0f} s. torch {s.get('torch')}, transformers "
             f"{s.get('transformers')}, CUDA {s.get('cuda')}; {s.get('memory_gib', 0):.0f} GiB, "
             f"{s.get('free_gib', 0):.1f} GiB free; square matmul {s.get('matmul_tflops', 0):.2f} TFLOP/s "
             f"({s.get('matmul_dtype')}).", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']} |" for name, p in parts.items()]
    run = parts["default_run"]
    if "taus" in run:
        lines += ["", f"Default run, {run['steps']} steps (bf16-mixed on {report['device']}, fp32 on the CPU): "
                  f"finite {run['finite']}, KL at step 1 {run['kl_step1']}, tau as on the CPU: {run['same_taus']}"
                  + (f" (first difference at step {run['first_tau_difference']})" if run["first_tau_difference"] else "")
                  + f"; median step {run['step_seconds_median']:.3f} s (CPU {run['cpu_step_seconds_median']:.3f} s)."]
    if parts["cuda_tests"].get("summary"):
        lines += ["", f"CUDA tests: {parts['cuda_tests']['summary']}"]
    lines += ["", "Seconds per phase (medians), the step's utilisation of the matmul rate, and each phase's peak "
              "memory in GiB with its ratio to the memory plan's (`bench.py --memory-plan`):", "",
              "| shape | path | rollout | reference | policy fwd | backward | optimizer | step s | utilisation | "
              "peak GiB (measured / plan) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in parts["steps"].get("rows", {}).items():
        if "paths" not in row:
            lines.append(f"| {name} | {row['status']} |" + " |" * 8)
            continue
        memory = ", ".join(f"{p} {m['measured']:.2f} ({m['measured_over_plan']:.2f}x)" for p, m in row["memory_gib"].items())
        for path, r in row["paths"].items():
            times = " | ".join(f"{r[p]:.3f}" for p in ("rollout", "reference", "policy_forward", "backward", "optimizer"))
            lines.append(f"| {name} | {path} | {times} | {r['total']:.3f} | {r['utilisation']['step']['utilisation']:.0%} "
                         f"| {memory} |")
    return "\n".join(lines) + "\n"


def run_check(out_dir, device="auto", quick=False, budget=BUDGET_SECONDS):
    """Every part in turn, each guarded; writes OUT/gpu_check.json and .md and returns the report."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py --gpu-check --device cuda: CUDA is not available here (use --device cpu)")
    os.makedirs(out_dir, exist_ok=True)
    t0, deadline = time.time(), time.time() + budget
    reuse_freed_memory()  # as train.py runs
    steps, warmup, default_steps = (1, 0, 2) if quick else (2, 1, DEFAULT_RUN_STEPS)
    parts = {"stack": guarded("stack", stack, device)}
    parts["cuda_tests"] = guarded("cuda tests", cuda_tests, device, 240)
    parts["default_run"] = guarded("default run", default_run, device, out_dir, default_steps, 300)
    parts["steps"] = guarded("steps", steps_part, device, QUICK_STEPS if quick else FULL_STEPS, steps, warmup, deadline)
    report = {"command": " ".join(["python", "bench.py", "--gpu-check", "--device", device, "--out", out_dir]
                                  + (["--quick"] if quick else [])),
              "device": device, "quick": quick, "seconds": time.time() - t0, "parts": parts}
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report
