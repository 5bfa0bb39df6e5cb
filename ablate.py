"""The paper's comparison on the built-in benchmark, in one command (METHOD.md sections 6 and 8).

    python ablate.py                      # main study: 3 modalities x 3 seeds x 5 methods
    python ablate.py --study conditions   # the rule ablations of MedLoc-R1 on one modality
    python ablate.py --quick              # 1 seed, short runs: a smoke test of the whole study

Every method of a (modality, seed) starts from the same SFT warm-start checkpoint and runs the same
number of steps with the same prompts and completions per step. Each run is a `train.py`
subprocess in results/runs/<study>/; a run with an eval.json is finished and is not redone, one
that stopped part-way is resumed from its checkpoint. Writes results/<study>.md, .json and PNG plots.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
MODALITIES = ("derm", "xray", "us")
METRICS = ("A@0.5", "A@0.8", "mAP", "mIoU")

# METHOD.md section 8 rows; each is extra train.py flags on top of the shared ones
MAIN = {
    "sft": ["--algo", "sft"],
    "fixed": ["--schedule", "fixed", "--tau", "0.5"],
    "raw-iou": ["--schedule", "raw-iou"],
    "stages": ["--schedule", "stages", "--stages", "0:0.5,0.3333:0.65,0.6667:0.8"],
    "medloc": ["--schedule", "medloc", "--step-rule", "piecewise"],
}
# METHOD.md section 6 ablations of the rule
NO = {"reward": "--no-reward-check", "stability": "--no-stability-check", "margin": "--no-margin-check"}
CONDITIONS = {
    "medloc": ["--schedule", "medloc"],
    **{f"without-{c}": ["--schedule", "medloc", NO[c]] for c in NO},
    **{f"only-{c}": ["--schedule", "medloc"] + [NO[o] for o in NO if o != c] for c in NO},
    **{f"constant-{d}": ["--schedule", "medloc", "--step-rule", "constant", "--constant-delta", d]
       for d in ("0.05", "0.15", "0.25")},
    "linear": ["--schedule", "medloc", "--step-rule", "linear", "--tau0", "0.2"],
    "cosine": ["--schedule", "medloc", "--step-rule", "cosine", "--tau0", "0.2"],
    # reference for the reward-sparsity comparison: the strict threshold from the first step
    "fixed-0.8": ["--schedule", "fixed", "--tau", "0.8"],
}


def plan(args):
    """(modalities, seeds, methods, sizes) of the chosen study."""
    full = dict(seeds=[0, 1, 2], warm_steps=args.warm_steps, steps=args.steps)
    quick = dict(seeds=[0], warm_steps=args.warm_steps // 2, steps=args.steps // 3)
    sizes = quick if args.quick else full
    if args.study == "main":
        return MODALITIES, sizes, MAIN
    return (args.modality,), sizes, CONDITIONS


def run_train(flags, run_dir, log):
    """One train.py run; resumes a stopped one, skips a finished one. Returns wall seconds."""
    if os.path.exists(os.path.join(run_dir, "eval.json")):
        return 0.0
    resumable = any(n.startswith("checkpoint-") and not n.endswith(".tmp") for n in
                    (os.listdir(run_dir) if os.path.isdir(run_dir) else []))
    if os.path.isdir(run_dir) and not resumable:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: start again
    cmd = [sys.executable, os.path.join(HERE, "train.py")]
    cmd += ["--resume", run_dir] if resumable else flags + ["--out", run_dir]
    t0 = time.time()
    with open(log, "a") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=HERE)
    return time.time() - t0


def shared_flags(args, modality, seed):
    return ["--dataset", f"synth:{modality}", "--seed", str(seed), "--threads", "1",
            "--eval-n", str(args.eval_n), "--save-every", str(args.save_every)]


def run_study(args):
    modalities, sizes, methods = plan(args)
    suffix = "-quick" if args.quick else ""
    root = os.path.join(args.out, "runs", args.study + suffix)
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "train.log")
    cells = [(m, s) for m in modalities for s in sizes["seeds"]]
    # one warm start per (modality, seed), shared by both studies
    warm = {c: os.path.join(args.out, "runs", "warmstart" + suffix, f"{c[0]}-s{c[1]}") for c in cells}

    def warm_start(cell):
        flags = shared_flags(args, *cell) + ["--algo", "sft", "--steps", str(sizes["warm_steps"]),
                                             "--batch-prompts", str(args.sft_batch), "--lr", str(args.sft_lr)]
        return run_train(flags, warm[cell], log)

    def method_run(job):
        cell, name = job
        flags = shared_flags(args, *cell) + ["--init", os.path.join(warm[cell], "final"),
                                             "--steps", str(sizes["steps"])] + methods[name]
        if name == "sft":  # same steps and prompts per step; supervised loss at the GRPO lr
            flags += ["--batch-prompts", str(args.batch_prompts)]
        return run_train(flags, os.path.join(root, f"{cell[0]}-s{cell[1]}", name), log)

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(warm_start, cells))
        print(f"warm starts done ({time.time() - t0:.0f} s)", flush=True)
        jobs = [(c, n) for c in cells for n in methods]
        for k, _ in enumerate(pool.map(method_run, jobs), 1):
            print(f"\r{k}/{len(jobs)} runs done ({time.time() - t0:.0f} s)", end="", flush=True)
    print()
    # wall time over every invocation, so a resumed study still reports what it cost
    timing = os.path.join(root, "wall_seconds.json")
    spent = time.time() - t0
    if os.path.exists(timing):
        with open(timing) as f:
            spent += json.load(f)
    with open(timing, "w") as f:
        json.dump(spent, f)
    return root, warm, cells, methods, spent


# ----------------------------------------------------------------------------- reporting
def read_run(run_dir):
    with open(os.path.join(run_dir, "eval.json")) as f:
        metrics = json.load(f)
    log = []
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            log = [json.loads(line) for line in f]
    return metrics, log


def collect(root, warm, cells, methods):
    rows, warm_rows, curves = [], [], {}
    for modality, seed in cells:
        cell_dir = os.path.join(root, f"{modality}-s{seed}")
        metrics, _ = read_run(warm[(modality, seed)])
        warm_rows.append({"modality": modality, "seed": seed, **{k: metrics[k] for k in METRICS}})
        for name in methods:
            metrics, log = read_run(os.path.join(cell_dir, name))
            sparsity = [r["frac_equal_groups"] for r in log if "frac_equal_groups" in r]
            early = sparsity[:max(len(sparsity) // 4, 1)] if sparsity else None  # None: SFT rows
            rows.append({"modality": modality, "method": name, "seed": seed,
                         **{k: metrics[k] for k in METRICS}, "parse_fail": metrics["parse_fail"],
                         "by_size": metrics["by_size"], "final_tau": log[-1]["tau"] if sparsity else None,
                         "early_frac_equal_groups": statistics.mean(early) if early else None})
            curves[(modality, name, seed)] = log
    return rows, warm_rows, curves


def mean_std(values):
    values = [100 * v for v in values]
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def table(rows, warm_rows, methods, modalities):
    """Markdown table in the paper's shape: a row per (modality, metric), a column per method."""
    lines = ["| modality | metric | warm start | " + " | ".join(methods) + " |",
             "|" + "---|" * (3 + len(methods))]
    for m in modalities:
        for k in METRICS:
            cells = [mean_std([r[k] for r in warm_rows if r["modality"] == m])]
            cells += [mean_std([r[k] for r in rows if r["modality"] == m and r["method"] == name])
                      for name in methods]
            lines.append(f"| synth:{m} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sparsity_table(rows, methods, modalities):
    """Fraction of all-equal-reward groups in the first quarter of training (GRPO rows)."""
    lines = ["| method | " + " | ".join(modalities) + " |", "|" + "---|" * (1 + len(modalities))]
    for name in methods:
        vals = [[r["early_frac_equal_groups"] for r in rows if r["method"] == name and r["modality"] == m]
                for m in modalities]
        if any(v is None for vs in vals for v in vs):
            continue
        lines.append(f"| {name} | " + " | ".join(mean_std(v) for v in vals) + " |")
    return "\n".join(lines)


def smooth(values, k=10):
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(curves, methods, modalities, seeds, key, ylabel, path, k=1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.6), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for name in methods:
            logs = [curves[(modality, name, s)] for s in seeds]
            if not logs[0] or key not in logs[0][0] or logs[0][0][key] is None:
                continue
            n = min(len(log) for log in logs)
            mean = [statistics.mean(log[i][key] for log in logs) for i in range(n)]
            ax.plot(range(1, n + 1), smooth(mean, k), label=name)
        ax.set_title(f"synth:{modality}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, root, warm, cells, methods, wall):
    from eval import write_json
    modalities = sorted({m for m, _ in cells}, key=MODALITIES.index)
    seeds = sorted({s for _, s in cells})
    rows, warm_rows, curves = collect(root, warm, cells, methods)
    name = args.study + ("-quick" if args.quick else "")
    write_json(rows, os.path.join(args.out, f"{name}.json"))
    write_json(warm_rows, os.path.join(args.out, f"{name}_warmstart.json"))
    grpo_methods = [m for m in methods if m != "sft"]
    for key, ylabel, k in (("tau", "IoU threshold tau", 1), ("hit_rate", "hit rate (IoU >= tau)", 10),
                           ("frac_equal_groups", "all-equal-reward groups", 10)):
        path = os.path.join(args.out, f"{name}_{key}.png")
        plot(curves, grpo_methods, modalities, seeds, key, ylabel, path, k)
    md = [f"# {name}: {len(seeds)} seed(s), metrics in % (mean ± std over seeds)", "",
          f"`{' '.join(['python', 'ablate.py'] + sys.argv[1:])}`: {wall / 60:.1f} min of wall time on this "
          "2-core machine (summed over invocations if it was resumed)", "",
          table(rows, warm_rows, methods, modalities), "",
          "All-equal-reward groups (no gradient) in the first quarter of training, %:", "",
          sparsity_table(rows, grpo_methods, modalities), "",
          f"Plots: {name}_tau.png, {name}_hit_rate.png, {name}_frac_equal_groups.png"]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="main", choices=("main", "conditions"))
    p.add_argument("--modality", default="derm", choices=MODALITIES,
                   help="modality of the conditions study (the paper ablates on HAM10000)")
    p.add_argument("--quick", action="store_true", help="1 seed and shorter runs")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--warm-steps", type=int, default=900, help="SFT warm-start steps")
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=150, help="steps of every compared run")
    p.add_argument("--batch-prompts", type=int, default=4, help="B of GRPO, and the SFT rows' batch")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50)
    args = p.parse_args(argv)
    report(args, *run_study(args))


if __name__ == "__main__":
    main()
