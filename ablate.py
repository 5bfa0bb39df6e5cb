"""The paper's comparison on the built-in benchmark, in one command (METHOD.md sections 6 and 8).

    python ablate.py --study ceiling      # supervised to convergence, per modality: the ceiling
    python ablate.py                      # main study: 3 modalities x 5 seeds x 5 methods
    python ablate.py --study conditions   # the rule ablations of MedLoc-R1 on one modality
    python ablate.py --quick              # 1 seed, short runs: a smoke test of the whole study
    python ablate.py --study vrft         # VRFT-Aug's augmentations on synth:grade and synth:type

The protocol (README, "The paper's comparison"): the ceiling runs come first; each modality's warm
start is SFT for as many steps as its ceiling curve needed to reach --warm-fraction of its best
mIoU; every method of a (modality, seed) starts from that warm start and runs the same number of
steps with the same prompts and completions per step. Each run is a `train.py` subprocess in
results/runs/; a run with an eval.json is finished and is not redone, one that stopped part-way is
resumed from its checkpoint. Writes results/<study>.md, .json and PNG plots.
"""
import argparse
import json
import math
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


# VRFT-Aug (METHOD.md section 10): rows of the augmentation study on the built-in classification
# sets; every row uses the r1 template (so there is reasoning to recite or not).
VRFT_SETS = ("grade", "type")
VRFT = {
    "sft": ["--algo", "sft"],
    "rft": [],                                                      # plain visual RFT: accuracy + format
    "+PA_p": ["--knowledge"],                                       # class descriptions in the prompt
    "+PA_pi": [],                                                   # from a grounding-GRPO model (warm start)
    "+ground-sft": [],                                              # control: from that model's SFT stage only
    "+MFRS": ["--mfrs-weight", "1"],                                # ordinal sets only
    "+recite": ["--knowledge", "--recite-weight", "0.5"],          # rewarding recitation
    "-recite": ["--knowledge", "--recite-weight", "-0.5"],         # penalising it (the paper's choice)
    "all": ["--knowledge", "--mfrs-weight", "1", "--recite-weight", "-0.5"],  # + PA_pi; never tried by the paper
}
# rows whose warm start begins from a grounding model: its name in the warm-start folder and the
# model, in the grounding run, it starts from (the GRPO result, or the SFT stage before GRPO)
PERCEPTION_FIRST = {"+PA_pi": ("perception", "final"), "all": ("perception", "final"),
                    "+ground-sft": ("ground-sft", os.path.join("warmstart", "model"))}
VRFT_METRICS = ("accuracy", "macro_f1", "qwk", "mae")
# the study's paired differences (a, b, what a - b measures): each augmentation against the row
# it adds to, on the same seeds
VRFT_CONTRASTS = (("sft", "rft", "SFT instead of RL"), ("+PA_p", "rft", "knowledge in the prompt"),
                  ("+PA_pi", "rft", "grounding SFT + RL first"),
                  ("+ground-sft", "rft", "grounding SFT first"),
                  ("+PA_pi", "+ground-sft", "the grounding RL itself"),
                  ("+MFRS", "rft", "the fuzzy grade reward"),
                  ("+recite", "+PA_p", "rewarding recitation"), ("-recite", "+PA_p", "penalising recitation"),
                  ("all", "+PA_pi", "knowledge, MFRS and -recite on top of PA_pi"))


def vrft_rows(kind):
    """The rows run on a set: MFRS needs ordinal grades (its row is skipped elsewhere)."""
    return [r for r in VRFT if kind == "grade" or r != "+MFRS"]


def vrft_flags(name, kind):
    """A row's flags on a set; on a non-ordinal set "all" runs without MFRS."""
    flags = VRFT[name]
    if kind != "grade" and "--mfrs-weight" in flags:
        i = flags.index("--mfrs-weight")
        flags = flags[:i] + flags[i + 2:]
    return flags


def run_vrft(args):
    """Per (set, seed): a classification warm start from the random tiny model and one from a
    grounding-GRPO model (PA_pi: `--init` of a `train.py` grounding run), then every row."""
    sizes = dict(seeds=[0] if args.quick else list(range(args.vrft_seeds)),
                 steps=args.vrft_steps // 3 if args.quick else args.vrft_steps)
    root = os.path.join(args.out, "runs", "vrft" + ("-quick" if args.quick else ""))
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "train.log")
    cells = [(k, s) for k in VRFT_SETS for s in sizes["seeds"]]
    common = ["--task", "classify", "--template", "r1", "--threads", "1", "--eval-n", str(args.eval_n),
              "--save-every", str(args.save_every)]

    def grounding(seed):  # PA_pi's first stage: MedLoc-R1 GRPO on synth:derm from its SFT warm start
        return run_train(["--dataset", "synth:derm", "--seed", str(seed), "--threads", "1", "--eval-n", "50",
                          "--sft-steps", str(args.vrft_grounding_warm), "--steps", str(sizes["steps"])],
                         os.path.join(root, f"grounding-s{seed}"), log)

    def warm(cell, perception, knowledge):  # SFT on the prompt its rows will see
        kind, seed = cell
        init = ["--init", os.path.join(root, f"grounding-s{seed}", perception[1])] if perception else []
        return run_train(common + init + ["--dataset", f"synth:{kind}", "--seed", str(seed)]
                         + sft_flags(args, args.vrft_warm_steps) + (["--knowledge"] if knowledge else []),
                         warm_dir(root, cell, perception, knowledge), log)

    def row(job):
        (kind, seed), name = job
        start = start_of(root, (kind, seed), name)
        flags = common + ["--dataset", f"synth:{kind}", "--seed", str(seed), "--steps", str(sizes["steps"]),
                          "--init", os.path.join(start, "final")]
        if name == "sft":
            flags += ["--batch-prompts", str(args.batch_prompts)]
        return run_train(flags + vrft_flags(name, kind), os.path.join(root, f"{kind}-s{seed}", name), log)

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(grounding, sizes["seeds"]))
        starts = {(c, PERCEPTION_FIRST.get(n), "--knowledge" in VRFT[n]) for c in cells for n in vrft_rows(c[0])}
        list(pool.map(lambda job: warm(*job), sorted(starts, key=str)))
        list(pool.map(row, [(c, name) for c in cells for name in vrft_rows(c[0])]))
    return root, cells, wall_so_far(root, time.time() - t0)


def warm_dir(root, cell, perception, knowledge):
    """A warm start per (set, seed, grounding model it starts from if any, knowledge in the prompt
    or not): the tiny model reads positions, so a prompt it was not warmed up on (PA_p adds lines)
    is a different input for it, not added information."""
    name = f"{cell[0]}-s{cell[1]}" + (f"-{perception[0]}" if perception else "") + ("-knowledge" if knowledge else "")
    return os.path.join(root, "warmstart", name)


def start_of(root, cell, method):
    """The warm-start folder a row of the vrft study begins from."""
    return warm_dir(root, cell, PERCEPTION_FIRST.get(method), "--knowledge" in VRFT[method])


def report_vrft(args, root, cells, wall):
    """results/vrft.md: a row per method, a column per (set, metric) and the accuracy of its warm
    start, mean ± std over seeds; the VRFT_CONTRASTS paired by seed; a bar plot of the test
    metrics and training curves."""
    from eval import write_json
    name = "vrft" + ("-quick" if args.quick else "")
    rows, curves = [], {}
    for kind, seed in cells:
        for method in vrft_rows(kind):
            metrics, curves[(kind, method, seed)] = read_run(os.path.join(root, f"{kind}-s{seed}", method))
            start, _ = read_run(start_of(root, (kind, seed), method))
            rows.append({"set": kind, "seed": seed, "method": method, "start_accuracy": start["accuracy"],
                         **{k: metrics[k] for k in VRFT_METRICS if k in metrics}})
    write_json(rows, os.path.join(args.out, f"{name}.json"))
    seeds = sorted({s for _, s in cells})
    # the rows start from different warm starts: each set's last column is the accuracy it began at
    columns = [(k, m) for k in VRFT_SETS for m in VRFT_METRICS + ("start_accuracy",)
               if k == "grade" or m in ("accuracy", "macro_f1", "start_accuracy")]

    def values(method, kind, metric):  # by seed, so that two methods' lists pair up
        return [r[metric] for r in sorted(rows, key=lambda r: r["seed"])
                if r["set"] == kind and r["method"] == method and metric in r]
    lines = [f"# {name}: {len(seeds)} seed(s), metrics in % (mae in grades), mean ± std over seeds", "",
             f"`{' '.join(['python', 'ablate.py'] + sys.argv[1:])}`: {wall / 60:.1f} min of wall time "
             "(summed over invocations if it was resumed)", "",
             "| method | " + " | ".join(f"{k} {m}".replace("start_accuracy", "warm-start accuracy") for k, m in columns)
             + " |", "|" + "---|" * (1 + len(columns))]
    for method in VRFT:
        cells_text = []
        for kind, metric in columns:
            v = values(method, kind, metric)
            scale = 1 if metric == "mae" else 100
            cells_text.append(f"{scale * statistics.mean(v):.1f} ± {scale * statistics.pstdev(v):.1f}" if v else "-")
        lines.append(f"| {method} | " + " | ".join(cells_text) + " |")
    paired = [(k, m) for k, m in columns if m in ("accuracy", "qwk")]
    lines += ["", "Differences paired by seed, in points, mean ± half-width of the 95 % t interval:", "",
              "| difference | what it measures | " + " | ".join(f"{k} {m}" for k, m in paired) + " |",
              "|" + "---|" * (2 + len(paired))]
    for a, b, meaning in VRFT_CONTRASTS:
        diffs = [paired_ci(values(a, k, m), values(b, k, m)) if values(a, k, m) else None for k, m in paired]
        lines.append(f"| {a} − {b} | {meaning} | "
                     + " | ".join("-" if d is None else f"{d[0]:+.1f} ± {d[1]:.1f}" for d in diffs) + " |")
    bars(values, columns, os.path.join(args.out, f"{name}.png"))
    grpo = [m for m in VRFT if m != "sft"]
    plot(curves, grpo, VRFT_SETS, seeds, "acc_mean", "training accuracy (group mean)",
         os.path.join(args.out, f"{name}_acc_mean.png"), k=10)
    plot(curves, [m for m in VRFT if "--recite-weight" in VRFT[m]], VRFT_SETS, seeds, "recite_mean",
         "R_recite (group mean)", os.path.join(args.out, f"{name}_recite_mean.png"), k=10)
    lines += ["", f"Plots: {name}.png (test metrics), {name}_acc_mean.png, {name}_recite_mean.png (training)"]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def bars(values, columns, path):
    """A panel per (set, metric) with a bar per method: mean over seeds, one standard deviation."""
    plt = pyplot()
    shown = [(k, m) for k, m in columns if m in ("accuracy", "qwk")]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.6), squeeze=False)
    for ax, (kind, metric) in zip(axes[0], shown):
        methods = [m for m in VRFT if values(m, kind, metric)]
        means = [100 * statistics.mean(values(m, kind, metric)) for m in methods]
        sds = [100 * statistics.pstdev(values(m, kind, metric)) for m in methods]
        ax.bar(range(len(methods)), means, yerr=sds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"synth:{kind} {metric} (%)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot drawing to files (no display needed), imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plan(args):
    """(modalities, sizes, methods) of the chosen study."""
    full = dict(seeds=list(range(args.seeds)), steps=args.steps)
    quick = dict(seeds=[0], steps=args.steps // 3)
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


def sft_flags(args, steps):
    return ["--algo", "sft", "--steps", str(steps), "--batch-prompts", str(args.sft_batch), "--lr", str(args.sft_lr)]


# ----------------------------------------------------------------------------- the ceiling
def ceiling_dir(args, modality):
    return os.path.join(args.out, "runs", "ceiling", modality)


def run_ceiling(args, modalities=MODALITIES):
    """Seed 0 of each modality supervised for --ceiling-steps, the test split scored every 250."""
    os.makedirs(os.path.join(args.out, "runs", "ceiling"), exist_ok=True)
    log = os.path.join(args.out, "runs", "ceiling", "train.log")

    def one(modality):
        flags = shared_flags(args, modality, 0) + sft_flags(args, args.ceiling_steps)
        return run_train(flags + ["--eval-every", "250", "--save-every", "1000"], ceiling_dir(args, modality), log)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, modalities))


def ceiling_curve(args, modality):
    """[(step, metrics)] of a ceiling run: the periodic evaluations, then the final one."""
    metrics, log = read_run(ceiling_dir(args, modality))
    curve = [(r["step"], {k: r[f"eval_{k}"] for k in METRICS}) for r in log if "eval_mIoU" in r]
    return curve + [(log[-1]["step"], {k: metrics[k] for k in METRICS})]


def warm_steps(curve, fraction):
    """SFT steps at which the ceiling curve first reaches `fraction` of its best mIoU (linear
    between evaluations, from mIoU 0 at step 0), rounded up to a multiple of 50."""
    target = fraction * max(m["mIoU"] for _, m in curve)
    previous = (0, 0.0)
    for step, m in curve:
        if m["mIoU"] >= target:
            s0, m0 = previous
            exact = s0 + (step - s0) * (target - m0) / (m["mIoU"] - m0)
            return int(math.ceil(exact / 50) * 50)
        previous = (step, m["mIoU"])
    raise ValueError("unreachable: the best point reaches any fraction <= 1")


def report_ceiling(args, modalities=MODALITIES):
    curves = {m: ceiling_curve(args, m) for m in modalities}
    lines = [f"# ceiling: SFT of seed 0 for {args.ceiling_steps} steps (batch {args.sft_batch}, lr {args.sft_lr}), "
             f"test split every 250 steps, metrics in %", "",
             "| modality | best step | A@0.5 | A@0.8 | mAP | mIoU | warm start: steps to "
             f"{args.warm_fraction:.0%} of best mIoU |", "|---|---|---|---|---|---|---|"]
    for m in modalities:
        step, best = max(curves[m], key=lambda point: point[1]["mIoU"])
        lines.append(f"| synth:{m} | {step} | " + " | ".join(f"{100 * best[k]:.1f}" for k in METRICS)
                     + f" | {warm_steps(curves[m], args.warm_fraction)} |")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("mIoU", "A@0.8")):
        for m in modalities:
            ax.plot([s for s, _ in curves[m]], [100 * p[key] for _, p in curves[m]], marker=".", label=f"synth:{m}")
        ax.set_xlabel("SFT step")
        ax.set_ylabel(f"test {key} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ceiling.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(args.out, "ceiling.md"), "w") as f:
        f.write("\n".join(lines + ["", "Plot: ceiling.png"]) + "\n")
    print("\n".join(lines))
    return {m: warm_steps(curves[m], args.warm_fraction) for m in modalities}


# ----------------------------------------------------------------------------- the comparison
def run_study(args):
    modalities, sizes, methods = plan(args)
    suffix = "-quick" if args.quick else ""
    root = os.path.join(args.out, "runs", args.study + suffix)
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "train.log")
    cells = [(m, s) for m in modalities for s in sizes["seeds"]]
    t0 = time.time()
    if args.warm_steps:
        steps = {m: args.warm_steps for m in modalities}
    else:  # the protocol: warm starts at a fixed fraction of each modality's measured ceiling
        run_ceiling(args, modalities)
        steps = report_ceiling(args, modalities)
    # one warm start per (modality, seed), shared by both studies
    warm = {c: os.path.join(args.out, "runs", "warmstart", f"{c[0]}-s{c[1]}-w{steps[c[0]]}") for c in cells}

    def warm_start(cell):
        return run_train(shared_flags(args, *cell) + sft_flags(args, steps[cell[0]]), warm[cell], log)

    def method_run(job):
        cell, name = job
        flags = shared_flags(args, *cell) + ["--init", os.path.join(warm[cell], "final"),
                                             "--steps", str(sizes["steps"])] + methods[name]
        if name == "sft":  # same steps and prompts per step; supervised loss at the GRPO lr
            flags += ["--batch-prompts", str(args.batch_prompts)]
        return run_train(flags, os.path.join(root, f"{cell[0]}-s{cell[1]}", name), log)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(warm_start, cells))
        print(f"warm starts done ({time.time() - t0:.0f} s)", flush=True)
        jobs = [(c, n) for c in cells for n in methods]
        for k, _ in enumerate(pool.map(method_run, jobs), 1):
            print(f"\r{k}/{len(jobs)} runs done ({time.time() - t0:.0f} s)", end="", flush=True)
    print()
    return root, warm, cells, methods, wall_so_far(root, time.time() - t0)


def wall_so_far(root, spent):
    """Wall seconds over every invocation of a study (this one spent `spent`), so a resumed or
    re-reported study still says what it cost."""
    timing = os.path.join(root, "wall_seconds.json")
    if os.path.exists(timing):
        with open(timing) as f:
            spent += json.load(f)
    with open(timing, "w") as f:
        json.dump(spent, f)
    return spent


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


# two-sided 95 % quantiles of Student's t by degrees of freedom (the normal's beyond 10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_ci(a, b):
    """Mean of the paired differences a - b (in %) and the half-width of its 95 % t interval."""
    d = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return statistics.mean(d), float("nan")
    return statistics.mean(d), T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))


def paired_table(rows, methods, modalities, of="medloc", metrics=("A@0.8", "mAP")):
    """`of` minus every other row, paired by seed (the same warm start), with 95 % intervals."""
    others = [m for m in methods if m != of]
    lines = ["| modality | metric | " + " | ".join(f"{of} - {o}" for o in others) + " |",
             "|" + "---|" * (2 + len(others))]
    for modality in modalities:
        for k in metrics:
            def by_seed(name):
                return [r[k] for r in sorted(rows, key=lambda r: r["seed"])
                        if r["modality"] == modality and r["method"] == name]
            cells = [paired_ci(by_seed(of), by_seed(o)) for o in others]
            lines.append(f"| synth:{modality} | {k} | " + " | ".join(f"{d:+.1f} ± {h:.1f}" for d, h in cells) + " |")
    return "\n".join(lines)


def smooth(values, k=10):
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(curves, methods, modalities, seeds, key, ylabel, path, k=1):
    """Mean over seeds per step (smoothed over k steps), with a band of one standard deviation."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.6), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for name in methods:
            logs = [curves.get((modality, name, s)) for s in seeds]  # None: a row a set does not run
            if not all(logs) or key not in logs[0][0] or logs[0][0][key] is None:
                continue
            n = min(len(log) for log in logs)
            mean = smooth([statistics.mean(log[i][key] for log in logs) for i in range(n)], k)
            sd = smooth([statistics.pstdev(log[i][key] for log in logs) for i in range(n)], k)
            ax.plot(range(1, n + 1), mean, label=name)
            ax.fill_between(range(1, n + 1), [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                            alpha=0.2)
        ax.set_title(f"synth:{modality}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0][0].get_lines():
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_KEYS = ("tau", "reward_mean", "hit_rate", "iou_mean", "frac_equal_groups", "r_bar", "sigma", "m_bar", "loss")


def write_curves(curves, path):
    """Every run's per-step numbers (the keys above; empty where a run has none) as one CSV."""
    with open(path + ".tmp", "w") as f:
        f.write("modality,method,seed,step," + ",".join(CURVE_KEYS) + "\n")
        for (modality, method, seed), log in sorted(curves.items()):
            for r in log:
                values = ["" if r.get(k) is None else f"{r[k]:.4g}" for k in CURVE_KEYS]
                f.write(f"{modality},{method},{seed},{r['step']}," + ",".join(values) + "\n")
    os.replace(path + ".tmp", path)


# per-step curves: key in metrics.jsonl, axis label, smoothing window (steps)
PLOTS = (("tau", "IoU threshold tau", 1), ("hit_rate", "hit rate (IoU >= tau)", 10),
         ("frac_equal_groups", "all-equal-reward groups", 10),
         ("r_bar", "MedLoc-R1 window: mean hit rate r_bar", 1), ("sigma", "window: hit-rate std sigma", 1),
         ("m_bar", "window: mean IoU - tau (m_bar)", 1))


def report(args, root, warm, cells, methods, wall):
    from eval import write_json
    modalities = sorted({m for m, _ in cells}, key=MODALITIES.index)
    seeds = sorted({s for _, s in cells})
    rows, warm_rows, curves = collect(root, warm, cells, methods)
    name = args.study + ("-quick" if args.quick else "")
    write_json(rows, os.path.join(args.out, f"{name}.json"))
    write_json(warm_rows, os.path.join(args.out, f"{name}_warmstart.json"))
    write_curves(curves, os.path.join(args.out, f"{name}_curves.csv"))
    grpo_methods = [m for m in methods if m != "sft"]
    for key, ylabel, k in PLOTS:
        path = os.path.join(args.out, f"{name}_{key}.png")
        plot(curves, grpo_methods, modalities, seeds, key, ylabel, path, k)
    md = [f"# {name}: {len(seeds)} seed(s), metrics in % (mean ± std over seeds)", "",
          f"`{' '.join(['python', 'ablate.py'] + sys.argv[1:])}`: {wall / 60:.1f} min of wall time on this "
          "2-core machine (summed over invocations if it was resumed)", "",
          table(rows, warm_rows, methods, modalities), "",
          "MedLoc-R1 minus each other row, paired by seed (same warm start), in points, "
          "mean ± half-width of the 95 % t interval:", "",
          paired_table(rows, methods, modalities), "",
          "All-equal-reward groups (no gradient) in the first quarter of training, %:", "",
          sparsity_table(rows, grpo_methods, modalities), "",
          "Plots: " + ", ".join(f"{name}_{key}.png" for key, _, _ in PLOTS)]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def parse_args(argv=None):
    """The study's flags, each size checked to be at least 1 (a one-line error otherwise)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="main", choices=("main", "conditions", "ceiling", "vrft"))
    p.add_argument("--modality", default="derm", choices=MODALITIES,
                   help="modality of the conditions study (the paper ablates on HAM10000)")
    p.add_argument("--quick", action="store_true", help="1 seed and shorter runs")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, each with its own warm start")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--ceiling-steps", type=int, default=5000, help="SFT steps of the ceiling runs")
    p.add_argument("--warm-fraction", type=float, default=0.4,
                   help="warm start: SFT until this fraction of the ceiling's best mIoU (seed 0's curve)")
    p.add_argument("--warm-steps", type=int, default=0, help="fixed SFT warm-start steps instead (0: from the ceiling)")
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300, help="steps of every compared run")
    p.add_argument("--batch-prompts", type=int, default=4, help="B of GRPO, and the SFT rows' batch")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--vrft-seeds", type=int, default=3, help="vrft study: seeds 0..N-1")
    p.add_argument("--vrft-steps", type=int, default=90, help="vrft study: steps of every row")
    p.add_argument("--vrft-warm-steps", type=int, default=150, help="vrft study: SFT warm-start steps")
    p.add_argument("--vrft-grounding-warm", type=int, default=650,
                   help="vrft study, PA_pi: SFT steps before the grounding GRPO stage")
    args = p.parse_args(argv)
    if not 0 < args.warm_fraction <= 1:
        p.error(f"--warm-fraction {args.warm_fraction}: must be in (0, 1]")
    for name in ("seeds", "jobs", "ceiling_steps", "steps", "batch_prompts", "eval_n", "save_every", "sft_batch",
                 "vrft_seeds", "vrft_steps", "vrft_warm_steps", "vrft_grounding_warm"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.study == "ceiling":
        run_ceiling(args)
        report_ceiling(args)
    elif args.study == "vrft":
        report_vrft(args, *run_vrft(args))
    else:
        report(args, *run_study(args))


if __name__ == "__main__":
    main()
