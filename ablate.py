"""The studies, one command each (METHOD.md sections 6, 8 and 10), on the built-in benchmark or yours.

    python ablate.py --study default   # `python train.py` on seeds 0-4: README's default-run table
    python ablate.py --study compare   # the paper's comparison where the curriculum can act
    python ablate.py --study rules     # MedLoc-R1's rule ablation, in the same regime
    python ablate.py --study loose     # the comparison from a start whose boxes are found but loose
    python ablate.py --study vrft      # VRFT-Aug's augmentations on synth:grade and synth:type
    python ablate.py --study multi     # several boxes per query: fixed 0.5, soft F1, MedLoc-R1 on F1 at tau, SFT
    python ablate.py --study sparsity  # the curriculum against DAPO's dynamic sampling where rewards are sparse
    python ablate.py --study scaling   # raw-iou, medloc, fixed with and without the group std (why the dense reward wins)
    python ablate.py --study headline  # the paper's claim at 1,000 steps on 128 records (after scaling: its rule)
    python ablate.py --study compare --quick   # 1 seed, a third of the steps: a smoke test
    python ablate.py --study compare --dataset TRAIN --eval-dataset TEST --model M --gpus 0,1 -- --lora-rank 64
                                               # on your data and model, rows queued over your GPUs

A study is one entry of STUDIES: its data sets, its rows (train.py flags on top of the shared
ones), the stages of runs it needs (warm starts before the rows that start from them), the run
each row starts from, the contrasts it reports and the curves it plots. One runner (`run_stages`)
runs each stage's `train.py` subprocesses in parallel (results/runs/<study>/...): a run with an
eval.json is finished and is not redone, one that stopped part-way is resumed from its checkpoint.
One writer (`report`) turns the finished runs into results/<study>.md, .json, _curves.csv and
PNG plots: mean ± std over seeds (the population SD), and differences paired by seed with 95 % t
intervals (the sample SD of the differences).
The protocols, and what the studies showed, are in results/README.md. --gpus queues the runs over
GPUs, --print-commands hands them to another scheduler and --report brings their folders back into
the table; --report-to sends every run to TensorBoard / W&B in the study's group (docs/usage.md).
"""
import argparse
import dataclasses
import json
import math
import os
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import config
from config import MAY_CHANGE_ON_RESUME
from files import Lock, RunError, first_line, write_json, write_whole
from trackers import parse_report_to

HERE = os.path.dirname(os.path.abspath(__file__))
GROUNDING = ("A@0.5", "A@0.8", "mAP", "mIoU")
CLASSIFICATION = ("accuracy", "macro_f1", "qwk", "mae")
RATIOS = ("mae", "box_area_ratio")  # reported as they are, not in %

# ----------------------------------------------------------------------------- the rows
# METHOD.md section 8: the paper's comparison
COMPARE = {
    "sft": ["--algo", "sft"],
    "fixed": ["--schedule", "fixed", "--tau", "0.5"],
    "raw-iou": ["--schedule", "raw-iou"],
    "stages": ["--schedule", "stages", "--stages", "0:0.5,0.3333:0.65,0.6667:0.8"],
    "medloc": ["--schedule", "medloc"],
}
# METHOD.md section 6: the paper's rule ablation (each check removed, each check alone)
NO = {"reward": "--no-reward-check", "stability": "--no-stability-check", "margin": "--no-margin-check"}
RULES = {
    "medloc": ["--schedule", "medloc"],
    **{f"without-{c}": ["--schedule", "medloc", NO[c]] for c in NO},
    **{f"only-{c}": ["--schedule", "medloc"] + [NO[o] for o in NO if o != c] for c in ("margin", "stability")},
}
# The comparison from a start whose boxes are found but loose (results/README.md, the loose-box protocol),
# with the margin check's ablation beside it
LOOSE = {**COMPARE, "without-margin": ["--schedule", "medloc", "--no-margin-check"]}
LOOSE_SCALE, LOOSE_WARM_STEPS = "1.15,1.35", 1000  # chosen before the rows ran (results/README.md)
TINY_WARM_START = os.path.join(HERE, "tiny-warmstart")
# Several boxes per query (METHOD.md 4.2; results/multi-protocol.md): MedLoc-R1's curriculum on F1 at
# tau against the fixed threshold, the soft F1 (Raw-IoU's analogue: --schedule raw-iou) and SFT
MULTI = {"sft": ["--algo", "sft"], "fixed": ["--schedule", "fixed", "--tau", "0.5"],
         "soft-f1": ["--schedule", "raw-iou"], "medloc": ["--schedule", "medloc"]}
MULTI_METRICS = ("F1@0.5", "F1@0.8", "soft_F1", "mAP@0.5")
# The curriculum against DAPO's dynamic sampling (METHOD.md 5.8; results/sparsity-protocol.md), from a
# start so loose that fixed 0.5 sees mostly all-zero groups. The dynamic-sampling rows sample more per
# step, so they are also scored every 10 steps, for the table at equal completions sampled.
SPARSITY = {"sft": ["--algo", "sft"], "fixed": ["--schedule", "fixed", "--tau", "0.5"],
            "raw-iou": ["--schedule", "raw-iou"], "medloc": ["--schedule", "medloc"],
            "dapo": ["--schedule", "fixed", "--tau", "0.5", "--recipe", "dapo", "--eval-every", "10"],
            "medloc+ds": ["--schedule", "medloc", "--dynamic-sampling", "--eval-every", "10"]}
SPARSE_SCALE = "1.7,1.9"  # the first scale that met the protocol's bar, measured before the rows ran
# Why the dense reward wins (results/scaling-protocol.md): Raw-IoU, MedLoc-R1 and fixed 0.5, each with
# the group std dividing the advantages (GRPO) and without it (Dr. GRPO), from the sparse start and the
# loose one; on the sparse start also the paper's stages and stages that start as low as MedLoc-R1
ADV_SCALES = {"group": [], "none": ["--adv-scale", "none"]}
LOW_STAGES = "0:0.3,0.3333:0.55,0.6667:0.8"


def scaled_rows(start):
    """The rows of one start of the scaling study: each of raw-iou, medloc and fixed under each scale."""
    return {f"{start}-{row}-{scale}": COMPARE[row] + flags
            for row in ("raw-iou", "medloc", "fixed") for scale, flags in ADV_SCALES.items()}


SCALING_STARTS = {  # start -> (its rows, the --sft-box-scale of its warm start)
    "sparse": ({**scaled_rows("sparse"), "sparse-stages-group": COMPARE["stages"],
                "sparse-low-stages-group": ["--schedule", "stages", "--stages", LOW_STAGES]}, SPARSE_SCALE),
    "loose": (scaled_rows("loose"), LOOSE_SCALE),
}
SCALING = {row: flags for rows, _ in SCALING_STARTS.values() for row, flags in rows.items()}


def scaling_interactions():
    """H1 and H2 of the protocol per start: how much more MedLoc-R1 gains over raw-iou (over fixed)
    without the group std than with it, (medloc - other | none) - (medloc - other | group)."""
    return tuple((f"{s}-medloc-none", f"{s}-{o}-none", f"{s}-medloc-group", f"{s}-{o}-group",
                  f"H{1 if o == 'raw-iou' else 2}, {s} start: MedLoc-R1's gain over {o}, without the std minus with it")
                 for s in SCALING_STARTS for o in ("raw-iou", "fixed"))


def scaling_contrasts():
    """Each scale's own contrasts, the scale's effect on each reward, and the stages rows."""
    pairs = [(f"{s}-medloc-{k}", f"{s}-{o}-{k}", f"MedLoc-R1 instead of {o}, {k} scaling")
             for s in SCALING_STARTS for k in ADV_SCALES for o in ("raw-iou", "fixed")]
    pairs += [(f"{s}-{r}-none", f"{s}-{r}-group", f"{r}: no std scaling instead of the group std")
              for s in SCALING_STARTS for r in ("raw-iou", "medloc", "fixed")]
    pairs += [("sparse-medloc-group", "sparse-stages-group", "MedLoc-R1 instead of the paper's stages"),
              ("sparse-low-stages-group", "sparse-stages-group", "stages starting at 0.3 instead of 0.5"),
              ("sparse-medloc-group", "sparse-low-stages-group", "performance-aware instead of timed, both from 0.3")]
    return tuple(pairs)


def two_starts(starts):
    """Stages of a study whose rows start from two warm starts (from_warm_start's, side by side):
    both warm starts first, then every row."""
    def stages(args, root, cells):
        parts = [from_warm_start(rows, loose=scale, warm_name=f"warmstart-{name}")(args, root, cells)
                 for name, (rows, scale) in starts.items()]
        warm, runs = [sum(stage, []) for stage in zip(*parts)]
        seed_first = {cell_dir(root, cell, ""): (cell[1], k) for k, cell in enumerate(cells)}
        # seed by seed: a study stopped part-way has whole seeds of every row, which pair
        return [warm, sorted(runs, key=lambda run: seed_first[os.path.dirname(run[0]) + os.sep])]
    return stages


# The paper's headline at its own horizon (results/headline-protocol.md): MedLoc-R1 against each other
# row of the comparison, 1,000 steps on the first HEADLINE_SIZE records from the sparse start, under
# the advantage scale that the scaling study's result picks (its protocol's rule, headline_scale)
HEADLINE_SIZE, HEADLINE_STEPS, HEADLINE_EVERY = 128, 1000, 250


def headline_scale(out):
    """The scaling protocol's rule: 'none' if H1 holds on the sparse start on both sets (the
    interaction on A@0.8 with its 95 % interval above 0), else 'group'; read from OUT/scaling.json,
    which must hold all five seeds of those four rows on both sets."""
    path, rows = os.path.join(out, "scaling.json"), ("medloc-none", "raw-iou-none", "medloc-group", "raw-iou-group")
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: the headline study takes its advantage scale from the scaling study's result "
                         f"({path}: {first_line(e)}); run python ablate.py --study scaling first")
    holds = []
    for kind in ("derm", "us"):
        x, y, z, w = (by_seed(records, kind, f"sparse-{row}", "A@0.8") for row in rows)
        if not len(x) == len(y) == len(z) == len(w) == 5:
            raise SystemExit(f"error: {path}: the sparse start's rows {', '.join(rows)} on {kind} are not finished "
                             "on all 5 seeds; the headline study waits for them (its protocol's rule)")
        mean, half = paired_ci([a - b for a, b in zip(x, y)], [a - b for a, b in zip(z, w)])
        holds.append(mean - half > 0)
    return "none" if all(holds) else "group"


def headline_stages(args, root, cells):
    """The headline's rows from the sparse start: --train-size, the horizon, evaluations on the way."""
    scale = ADV_SCALES[headline_scale(args.out)]
    steps = HEADLINE_STEPS // 3 if args.quick else HEADLINE_STEPS
    rows = {row: flags + ["--train-size", str(HEADLINE_SIZE), "--eval-every", str(HEADLINE_EVERY)]
            + (scale if row != "sft" else []) for row, flags in COMPARE.items()}
    return from_warm_start(rows, loose=SPARSE_SCALE)(argparse.Namespace(**{**vars(args), "steps": steps}), root, cells)


# VRFT-Aug (METHOD.md section 10) on the built-in classification sets, every row with the r1 template (so there is reasoning to recite)
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


# ----------------------------------------------------------------------------- the studies
@dataclass
class Study:
    """sets: the data sets (synth:KIND); rows: row -> flags; stages(args, root, cells) -> lists of
    (run folder, train.py flags), each list run after the one before; contrasts: (a, b, what a - b
    measures), paired by seed; curves: (metrics.jsonl key, label, smoothing steps) plotted per
    step; rows_of(kind): the rows a set runs (default: all); early: the steps the early all-equal
    fraction averages (default: the first quarter); equal_completions: the rows sample unequally
    (dynamic sampling), so they are also compared at the completions the fewest-sampling GRPO row
    drew (each at its last evaluation at or before that budget); contrasted: the metrics the
    contrasts take (default: those that A@0.5, mIoU or macro-F1 do not already summarise);
    interactions: (a, b, c, d, what it measures), the difference of two contrasts (a - b) - (c - d),
    paired by seed; seeds: set -> how many seeds it runs (default --seeds); ranked: the steps at
    which the rows are ranked by their mean first metric (from their evaluations on the way, and
    eval.json at the end); data: the --dataset of the one set "data" a study on the user's data runs."""
    sets: tuple
    rows: dict
    stages: object
    metrics: tuple
    contrasts: tuple
    curves: tuple
    rows_of: object = None
    early: int = None
    equal_completions: bool = False
    contrasted: tuple = None
    interactions: tuple = ()
    seeds: dict = None
    ranked: tuple = ()
    data: str = None

    def rows_for(self, kind):
        return self.rows_of(kind) if self.rows_of else list(self.rows)


def cell_dir(root, cell, row):
    return os.path.join(root, f"{cell[0]}-s{cell[1]}", row)


def common(args, kind, seed):
    data = ["--dataset", args.dataset, "--eval-dataset", args.eval_dataset] if args.dataset else ["--dataset", f"synth:{kind}"]
    return data + ["--seed", str(seed), "--threads", "1", "--eval-n", str(args.eval_n), "--save-every", str(args.save_every)]


def default_stages(args, root, cells):
    """`python train.py --seed s`: the command line a newcomer runs, every default untouched."""
    return [[(cell_dir(root, cell, "medloc"), ["--seed", str(cell[1]), "--threads", "1"]) for cell in cells]]


def from_warm_start(rows, loose=None, warm_set="mix", warm_name="warmstart"):
    """Stages of a study whose rows all start from one model and run --steps steps with B prompts
    x G completions (the SFT row: B supervised answers per step, at the GRPO lr). The model is
    --init if given, else an SFT warm start of --warm-steps on synth:mix (seed 0), run first: one
    starting model for every seed, as a pretrained VLM is for the paper's. `loose` (a scale, as
    "LO,HI"): the shipped warm start, then --loose-warm-steps of SFT on the true boxes loosened by
    that scale, or by --loose-scale if given (METHOD.md 8).
    `warm_set`: the synthetic set of the warm start (multi: the study of several boxes); `warm_name`:
    its folder in the study's (a study of two starts has two)."""
    def stages(args, root, cells):
        warm = os.path.join(root, warm_name)
        steps, lr, start = args.warm_steps, ["--lr", "1e-3"], []
        if loose:  # the shipped warm start (SFT on the exact boxes), then SFT on loosened ones
            steps, lr = args.loose_warm_steps, ["--lr", "3e-4"]
            start = ["--init", TINY_WARM_START, "--sft-box-scale", args.loose_scale or loose]
        if args.model:  # a pretrained model: its own learning rate (train.py's default), its own start
            lr, start = [], ["--model", args.model] + start[2:]
        data = (["--dataset", args.dataset, "--eval-dataset", args.eval_dataset] if args.dataset
                else ["--dataset", f"synth:{warm_set}"])
        first = [] if args.init else [(warm, ["--algo", "sft"] + data + ["--steps", str(steps), "--batch-prompts", "16"]
                                       + lr + ["--seed", "0", "--threads", "1", "--eval-n", str(args.eval_n),
                                               "--save-every", "500"] + start)]
        init = args.init or os.path.join(warm, "final")
        runs = []
        for cell in cells:
            for row, flags in rows.items():
                flags = common(args, *cell) + ["--init", init, "--steps", str(args.steps)] + flags
                if row == "sft":
                    flags += ["--batch-prompts", str(args.batch_prompts)]
                runs.append((cell_dir(root, cell, row), flags))
        return [stage for stage in (first, runs) if stage]
    return stages


def warm_dir(root, cell, perception, knowledge):
    """A VRFT warm start per (set, seed, grounding model it starts from if any, knowledge in the
    prompt or not): the tiny model reads positions, so a prompt it was not warmed up on (PA_p adds
    lines) is a different input for it, not added information."""
    name = f"{cell[0]}-s{cell[1]}" + (f"-{perception[0]}" if perception else "") + ("-knowledge" if knowledge else "")
    return os.path.join(root, "warmstart", name)


def vrft_start(root, cell, row):
    """The warm-start folder a row of the vrft study begins from."""
    return warm_dir(root, cell, PERCEPTION_FIRST.get(row), "--knowledge" in VRFT[row])


def vrft_stages(args, root, cells):
    """Per seed, PA_pi's grounding run (SFT, then MedLoc-R1 GRPO on synth:derm); per (set, seed,
    starting point) a classification SFT warm start on the prompt its rows see; then every row."""
    steps = max(args.vrft_steps // 3, 1) if args.quick else args.vrft_steps
    shared = ["--task", "classify", "--template", "r1", "--threads", "1", "--eval-n", str(args.eval_n),
              "--save-every", str(args.save_every)]
    seeds = sorted({seed for _, seed in cells})
    grounding = [(os.path.join(root, f"grounding-s{seed}"),
                  ["--dataset", "synth:derm", "--seed", str(seed), "--threads", "1", "--eval-n", "50",
                   "--sft-steps", str(args.vrft_grounding_warm), "--steps", str(steps)]) for seed in seeds]
    warm, rows = {}, []
    for cell in cells:
        kind, seed = cell
        for row in vrft_rows(kind):
            perception, knowledge = PERCEPTION_FIRST.get(row), "--knowledge" in VRFT[row]
            folder = vrft_start(root, cell, row)
            init = ["--init", os.path.join(root, f"grounding-s{seed}", perception[1])] if perception else []
            warm[folder] = (shared + init + ["--dataset", f"synth:{kind}", "--seed", str(seed), "--algo", "sft",
                                             "--steps", str(args.vrft_warm_steps), "--batch-prompts", "16",
                                             "--lr", "1e-3"] + (["--knowledge"] if knowledge else []))
            flags = shared + ["--dataset", f"synth:{kind}", "--seed", str(seed), "--steps", str(steps),
                              "--init", os.path.join(folder, "final")] + vrft_flags(row, kind)
            if row == "sft":
                flags += ["--batch-prompts", str(args.batch_prompts)]
            rows.append((cell_dir(root, cell, row), flags))
    return [grounding, sorted(warm.items()), rows]


# per-step curves of the grounding studies: key in metrics.jsonl, axis label, smoothing window
CURRICULUM = (("tau", "IoU threshold tau", 1), ("hit_rate", "hit rate (IoU >= tau)", 10),
              ("frac_equal_groups", "all-equal-reward groups", 10),
              ("r_bar", "window: mean hit rate r_bar", 1), ("sigma", "window: hit-rate std sigma", 1),
              ("m_bar", "window: mean IoU - tau (m_bar)", 1))
STUDIES = {
    "default": Study(("mix",), {"medloc": []}, default_stages, GROUNDING, (),
                     CURRICULUM[:4]),
    "compare": Study(("derm", "us"), COMPARE, from_warm_start(COMPARE), GROUNDING,
                     tuple(("medloc", o, f"MedLoc-R1 instead of {o}") for o in COMPARE if o != "medloc"),
                     CURRICULUM),
    "rules": Study(("derm",), RULES, from_warm_start(RULES), GROUNDING,
                   tuple(("medloc", o, f"the full rule instead of {o}") for o in RULES if o != "medloc"),
                   CURRICULUM),
    "loose": Study(("derm", "us"), LOOSE, from_warm_start(LOOSE, loose=LOOSE_SCALE), GROUNDING + ("box_area_ratio",),
                   tuple(("medloc", o, f"MedLoc-R1 instead of {o}") for o in LOOSE if o != "medloc"),
                   CURRICULUM + (("box_area_ratio", "rollout box area / true box area", 10),)),
    "multi": Study(("multi",), MULTI, from_warm_start(MULTI, warm_set="multi"), MULTI_METRICS,
                   tuple(("medloc", o, f"MedLoc-R1 instead of {o}") for o in MULTI if o != "medloc"),
                   (("tau", "IoU threshold tau", 1), ("hit_rate", "F1 at tau (group mean)", 10),
                    ("frac_equal_groups", "all-equal-reward groups", 10), ("boxes_mean", "boxes per answer", 10))),
    "sparsity": Study(("derm", "us"), SPARSITY, from_warm_start(SPARSITY, loose=SPARSE_SCALE), GROUNDING,
                      tuple(("medloc", o, f"MedLoc-R1 instead of {o}") for o in SPARSITY if o != "medloc")
                      + tuple(("dapo", o, f"DAPO instead of {o}") for o in SPARSITY if o not in ("medloc", "dapo")),
                      CURRICULUM[:3] + (("completions_sampled", "completions sampled per step", 1),
                                        ("entropy", "entropy of sampled tokens (nats)", 10)),
                      early=30, equal_completions=True, contrasted=GROUNDING),
    "scaling": Study(("derm", "us"), SCALING, two_starts(SCALING_STARTS), GROUNDING, scaling_contrasts(),
                     CURRICULUM[:3] + (("group_reward_std", "reward std within a group (mean over groups)", 10),),
                     early=30, interactions=scaling_interactions()),
    "headline": Study(("derm", "us"), COMPARE, headline_stages, GROUNDING,
                      tuple(("medloc", o, f"MedLoc-R1 instead of {o}") for o in COMPARE if o != "medloc"),
                      CURRICULUM[:3], contrasted=("A@0.8", "mAP"), seeds={"derm": 5, "us": 10},
                      ranked=tuple(range(HEADLINE_EVERY, HEADLINE_STEPS + 1, HEADLINE_EVERY))),
    "vrft": Study(VRFT_SETS, VRFT, vrft_stages, CLASSIFICATION,
                  (("sft", "rft", "SFT instead of RL"), ("+PA_p", "rft", "knowledge in the prompt"),
                   ("+PA_pi", "rft", "grounding SFT + RL first"), ("+ground-sft", "rft", "grounding SFT first"),
                   ("+PA_pi", "+ground-sft", "the grounding RL itself"), ("+MFRS", "rft", "the fuzzy grade reward"),
                   ("+recite", "+PA_p", "rewarding recitation"), ("-recite", "+PA_p", "penalising recitation"),
                   ("all", "+PA_pi", "knowledge, MFRS and -recite on top of PA_pi")),
                  (("acc_mean", "training accuracy (group mean)", 10), ("recite_mean", "R_recite (group mean)", 10)),
                  vrft_rows),
}


# ----------------------------------------------------------------------------- the runner
def launch_flags(flags, names=MAY_CHANGE_ON_RESUME, keep=True):
    """The flags of `flags` that a resumed run takes again: how it runs and reports (--fsdp,
    --report-to, ...), not what it computes, which its config.json keeps. With keep=False, the
    flags not among `names`."""
    kept, out = False, []
    for f in flags:
        if f.startswith("--"):
            kept = (f[2:].split("=")[0].replace("-", "_") in names) == keep
        if kept:
            out.append(f)
    return out


def settings_of(flags):
    """What a run computes: its flags but those of how it runs (its --steps included: a row of
    other steps is another row)."""
    return launch_flags(flags, [n for n in MAY_CHANGE_ON_RESUME if n != "steps"], keep=False)


def settings_file(run_dir):
    """Beside a run's folder: the train.py flags it was started with (what it computes)."""
    return run_dir.rstrip(os.sep) + ".settings.json"


def record_settings(flags, run_dir):
    """Before a run's folder exists: the settings it is started with, beside it."""
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    if not os.path.isdir(run_dir):
        write_json(settings_of(flags), settings_file(run_dir), indent=None)


def settings_differ(flags, run_dir):
    """None when the run at `run_dir` may be reused or resumed for `flags`, else why not: a folder
    made by other settings (another --dataset, --steps, ...) is never reported as this study's."""
    try:
        with open(settings_file(run_dir)) as f:
            started = json.load(f)
    except FileNotFoundError:
        return f"{run_dir} holds a run that this study did not start (no {os.path.basename(settings_file(run_dir))})"
    except (OSError, ValueError) as e:
        return f"{settings_file(run_dir)}: unreadable ({first_line(e)})"
    wanted = settings_of(flags)
    if started != wanted:
        return (f"{run_dir} was started with other settings ({' '.join(started)}; this study's: {' '.join(wanted)})")
    return None


def command(flags, run_dir, gpus_per_row=1):
    """The train.py command of a run: resumed if it has a checkpoint, else new; under torchrun for
    a row of several GPUs."""
    resumable = any(n.startswith("checkpoint-") and not n.endswith(".tmp") for n in
                    (os.listdir(run_dir) if os.path.isdir(run_dir) else []))
    launcher = [sys.executable] if gpus_per_row == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                             "--standalone", "--nproc_per_node", str(gpus_per_row)]
    how = ["--resume", run_dir] + launch_flags(flags) if resumable else flags + ["--out", run_dir]
    return launcher + [os.path.join(HERE, "train.py")] + how


def log_of(run_dir):
    """Each run's own output, next to its folder (a run's folder is train.py's to create)."""
    return run_dir.rstrip(os.sep) + ".log"


def run_train(flags, run_dir, env=None, gpus_per_row=1):
    """One train.py run; resumes a stopped one, skips a finished one. Returns None, or why it failed
    or was not run: its exit status and the last lines of its log, or a folder it must not touch."""
    if os.path.isdir(run_dir):
        problem = settings_differ(flags, run_dir) or damaged_eval(run_dir)
        if problem:
            return problem + "; delete it or use another --out"
        if os.path.exists(os.path.join(run_dir, "eval.json")):
            return None
        if not any(n.startswith("checkpoint-") for n in os.listdir(run_dir)):
            try:
                with Lock(run_dir):  # a train.py still running there (no checkpoint yet) keeps its folder
                    shutil.rmtree(run_dir)  # stopped before its first checkpoint: start again
            except RunError as e:
                return str(e)
    record_settings(flags, run_dir)
    with open(log_of(run_dir), "a") as f:
        done = subprocess.run(command(flags, run_dir, gpus_per_row), stdout=f, stderr=subprocess.STDOUT, cwd=HERE,
                              env={**os.environ, **(env or {})})
    if not done.returncode:
        return None
    with open(log_of(run_dir), errors="replace") as f:
        tail = [line.rstrip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-5:]
    return f"exit status {done.returncode}; {log_of(run_dir)} ends: " + " | ".join(tail)


def slots_of(args):
    """Where runs go: --jobs CPU slots, or the --gpus list cut into groups of --gpus-per-row, each
    slot the environment its processes see (only their own GPUs)."""
    if not args.gpus:
        return [{}] * args.jobs
    k = args.gpus_per_row
    return [{"CUDA_VISIBLE_DEVICES": ",".join(args.gpus[i:i + k])} for i in range(0, len(args.gpus) - k + 1, k)]


def run_stages(stages, args):
    """Each stage's runs through a queue of slots (a slot takes the next run when it frees), a stage
    only after the one before; a run whose starting model failed is not tried. Returns (seconds,
    {run folder: why it failed or was not run})."""
    t0, failed, slots = time.time(), {}, queue.Queue()
    for slot in slots_of(args):
        slots.put(slot)

    def one(run):
        run_dir, flags = run
        init = flags[flags.index("--init") + 1] if "--init" in flags else ""
        broken = next((d for d in failed if init.startswith(d + os.sep)), None)
        if broken:
            return run_dir, f"not run: its start {broken} failed"
        slot = slots.get()
        try:
            return run_dir, run_train(flags, run_dir, slot, args.gpus_per_row if args.gpus else 1)
        finally:
            slots.put(slot)
    with ThreadPoolExecutor(slots.qsize()) as pool:
        for k, stage in enumerate(stages, 1):
            for run_dir, why in pool.map(one, stage):
                if why:
                    failed[run_dir] = why
                    print(f"failed: {run_dir}: {why}", flush=True)
            print(f"stage {k}/{len(stages)}: {len(stage)} runs ({time.time() - t0:.0f} s)", flush=True)
    return time.time() - t0, failed


def print_commands(stages, args, path):
    """One shell line per run, in the order they may start (each stage after the one before); each
    run's settings recorded beside its folder, as when the study starts it."""
    runs = [(run_dir, flags) for stage in stages for run_dir, flags in stage]
    problems = [p for p in (settings_differ(flags, d) for d, flags in runs if os.path.isdir(d)) if p]
    if problems:
        raise SystemExit(f"error: {problems[0]}; delete it or use another --out")
    for run_dir, flags in runs:
        record_settings(flags, run_dir)
    lines = [" ".join(shlex.quote(c) for c in ["cd", HERE]) + " && " +
             " ".join(shlex.quote(c) for c in command(flags, run_dir, args.gpus_per_row))
             for stage in stages for run_dir, flags in stage]
    write_whole(path, lambda f: f.write("\n".join(lines) + "\n"))
    print(f"wrote {len(lines)} commands to {path} (stages: {', '.join(str(len(s)) for s in stages)} runs)")


def wall_so_far(root, spent):
    """Wall seconds over every invocation of a study (this one spent `spent`), so a resumed or
    re-reported study still says what it cost."""
    timing = os.path.join(root, "wall_seconds.json")
    if os.path.exists(timing):
        with open(timing) as f:
            spent += json.load(f)
    write_json(spent, timing, indent=None)
    return spent


# ----------------------------------------------------------------------------- the report
def damaged_eval(run_dir):
    """None unless the run's eval.json is there but is not a JSON object of metrics: why not."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path}: damaged ({first_line(e)})"
    return None if isinstance(metrics, dict) and metrics else f"{path}: damaged (not a JSON object of metrics)"


def read_run(run_dir):
    """(eval.json, metrics.jsonl records) of a finished run, each record with the completions the
    step sampled (logged under dynamic sampling; B x G otherwise; none for SFT) and their running
    total, so that rows which sample unequally can be put side by side."""
    with open(os.path.join(run_dir, "eval.json")) as f:
        metrics = json.load(f)
    log = []
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            log = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    per_step, total = 0 if cfg["algo"] == "sft" else cfg["batch_prompts"] * cfg["group_size"], 0
    for r in log:
        total += r.setdefault("completions_sampled", per_step)
        r["completions_total"] = total
    return metrics, log


def at_budget(study, budget, metrics, start_metrics, log):
    """A run's test metrics at `budget` completions sampled, and the step they are from: its
    end if it sampled no more, else its last evaluation (--eval-every) at or before the budget (the
    start's, step 0, if none came before it); none if it was never evaluated on the way."""
    if not log or log[-1]["completions_total"] <= budget:
        return metrics, log[-1]["step"] if log else 0
    probe = f"eval_{study.metrics[0]}"
    if not any(probe in r for r in log):
        return {}, None
    evals = [r for r in log if r["completions_total"] <= budget and probe in r]
    if not evals:
        return start_metrics, 0
    return {k: evals[-1][f"eval_{k}"] for k in study.metrics if f"eval_{k}" in evals[-1]}, evals[-1]["step"]


def budget_of(logs):
    """The completions sampled by the GRPO run that sampled fewest (with B x G per step, steps x B x G):
    dynamic sampling samples at least that many per step."""
    return min((log[-1]["completions_total"] for log in logs if log and log[-1]["completions_total"]), default=0)


def record(study, root, cell, row, budget=None):
    """One run's line of results/<study>.json: its test metrics, those of the model it started
    from (start_*: train.py scores it in warmstart/eval.json), what its log says of the curriculum,
    of reward sparsity and of what it sampled, and (given a budget) its metrics at the budget."""
    folder = cell_dir(root, cell, row)
    metrics, log = read_run(folder)
    start_path = os.path.join(folder, "warmstart", "eval.json")  # absent when the run had no evaluation set
    start_metrics = {}
    if os.path.exists(start_path):
        with open(start_path) as f:
            start_metrics = json.load(f)
    raised = {r["step"]: r["tau"] for r in log if r.get("tau_changed")}
    taus = [r["tau"] for r in log if r.get("tau") is not None]
    equal = [r["frac_equal_groups"] for r in log if "frac_equal_groups" in r]
    early = equal[:study.early or max(len(equal) // 4, 1)]
    entropy = [r["entropy"] for r in log if "entropy" in r]
    spread = [r["group_reward_std"] for r in log if "group_reward_std" in r][:study.early or max(len(log) // 4, 1)]
    parse_fail = [r["parse_fail"] for r in log if "parse_fail" in r]
    line = {"set": cell[0], "seed": cell[1], "row": row,
            **{k: metrics[k] for k in study.metrics if k in metrics},
            **{f"start_{k}": start_metrics[k] for k in study.metrics if k in start_metrics},
            "final_tau": taus[-1] if taus else None, "raises": len(raised) if taus else None,
            "first_raise": min(raised, default=None),
            "early_frac_equal_groups": statistics.mean(early) if equal else None,
            "early_group_reward_std": statistics.mean(spread) if spread else None,
            "parse_fail": statistics.mean(parse_fail) if parse_fail else None}
    if budget:
        scored, step = at_budget(study, budget, metrics, start_metrics, log)
        line.update({f"budget_{k}": scored[k] for k in study.metrics if k in scored}, budget_step=step,
                    completions=log[-1]["completions_total"] if log else 0,
                    late_entropy=statistics.mean(entropy[-max(len(entropy) // 4, 1):]) if entropy else None)
    return line


def mean_std(values, scale=100, digits=1):
    values = [scale * v for v in values]
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


# two-sided 95 % quantiles of Student's t by degrees of freedom (the normal's beyond 10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_ci(a, b):
    """Mean of the paired differences a - b (in %) and the half-width of its 95 % t interval."""
    d = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return statistics.mean(d), float("nan")
    return statistics.mean(d), T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))


def columns(study, records):
    """(key, label, scale) of the table's columns that some record holds."""
    early = f"first {study.early} steps" if study.early else "first quarter"
    cols = [(k, k, 1 if k in RATIOS else 100) for k in study.metrics]
    cols += [(f"start_{k}", f"start {k}", 1 if k in RATIOS else 100) for k in study.metrics]
    cols += [("final_tau", "tau at the end", 1), ("raises", "tau raises", 1), ("first_raise", "first raise (step)", 1),
             ("early_frac_equal_groups", f"all-equal groups, {early} (%)", 100),
             ("early_group_reward_std", f"reward std within a group, {early}", 1),
             ("parse_fail", "unparsed answers while training (%)", 100),
             ("completions", "completions sampled (thousands)", 0.001),
             ("late_entropy", "entropy, last quarter (nats/token)", 1)]
    return [c for c in cols if any(r.get(c[0]) is not None for r in records)]


def budget_columns(study, records):
    """The columns of the table at equal completions sampled."""
    cols = [(f"budget_{k}", k, 1 if k in RATIOS else 100) for k in study.metrics]
    cols += [("budget_step", "step scored", 1), ("completions", "completions over the whole run (thousands)", 0.001)]
    return [c for c in cols if any(r.get(c[0]) is not None for r in records)]


def label(study, kind):
    """A set's name in the tables: a built-in one, or the --dataset given (the cells' kind "data")."""
    return study.data if kind == "data" else f"synth:{kind}"


def table(study, records, cols):
    """A line per (set, row), a column per metric: mean ± std over seeds ('-' where a row has none)."""
    lines = ["| set | row | " + " | ".join(label for _, label, _ in cols) + " |", "|" + "---|" * (2 + len(cols))]
    for kind in study.sets:
        for row in study.rows_for(kind):
            mine = [r for r in records if r["set"] == kind and r["row"] == row]
            cells = []
            for key, _, scale in cols:
                values = [r[key] for r in mine if r.get(key) is not None]
                digits = 2 if key in ("final_tau", "mae", "box_area_ratio", "start_box_area_ratio", "late_entropy",
                                      "early_group_reward_std") else 1
                cells.append(mean_std(values, scale, digits) if len(values) == len(mine) and values else "-")
            lines.append(f"| {label(study, kind)} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_seed(records, kind, row, key):
    return [r[key] for r in sorted(records, key=lambda r: r["seed"])
            if r["set"] == kind and r["row"] == row and r.get(key) is not None]


def contrast_table(study, records, prefix=""):
    """Each contrast a - b on each set, paired by seed, in points: mean ± half-width of the 95 % t
    interval (of the metrics at the budget with prefix "budget_")."""
    keys = study.contrasted or [k for k in study.metrics if k not in ("A@0.5", "mIoU", "macro_f1") + RATIOS]
    lines = ["| set | difference | what it measures | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for kind in study.sets:
        for a, b, meaning in study.contrasts:
            if a not in study.rows_for(kind) or b not in study.rows_for(kind):
                continue
            cells = []
            for k in keys:
                x, y = by_seed(records, kind, a, prefix + k), by_seed(records, kind, b, prefix + k)
                cells.append(("{:+.1f} ± {:.1f}".format(*paired_ci(x, y))) if x and len(x) == len(y) else "-")
            lines.append(f"| {label(study, kind)} | {a} − {b} | {meaning} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interaction_table(study, records):
    """Each interaction (a - b) - (c - d) on each set, paired by seed, in points: mean ± half-width
    of the 95 % t interval, and how many seeds it is positive on."""
    keys = study.contrasted or [k for k in study.metrics if k not in ("A@0.5", "mIoU", "macro_f1") + RATIOS]
    lines = ["| set | interaction | what it measures | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for kind in study.sets:
        for a, b, c, d, meaning in study.interactions:
            cells = []
            for k in keys:
                x, y, z, w = (by_seed(records, kind, row, k) for row in (a, b, c, d))
                if not x or not len(x) == len(y) == len(z) == len(w):
                    cells.append("-")
                    continue
                gain_none, gain_group = [p - q for p, q in zip(x, y)], [p - q for p, q in zip(z, w)]
                mean, half = paired_ci(gain_none, gain_group)
                positive = sum(round(p - q, 9) > 0 for p, q in zip(gain_none, gain_group))  # 0.4 - 0.2 = 0.3 - 0.1
                cells.append(f"{mean:+.1f} ± {half:.1f} ({positive}/{len(x)} > 0)")
            lines.append(f"| {label(study, kind)} | ({a} − {b}) − ({c} − {d}) | {meaning} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking_table(study, curves, steps):
    """Per set and step, the rows from best to worst by their mean first metric over seeds: from the
    evaluations on the way (eval_* in metrics.jsonl), and the final one (eval.json) at the last step."""
    key, lines = study.metrics[1] if "A@0.8" in study.metrics else study.metrics[0], []
    lines = [f"| set | step | rows by mean {key} over seeds, best first |", "|---|---|---|"]
    for kind in study.sets:
        for step in steps:
            means = {}
            for row in study.rows_for(kind):
                runs = [(log, final) for (k, r, _), (log, final) in curves.items() if k == kind and r == row]
                values = [final[key] if log and log[-1]["step"] == step else
                          next((x[f"eval_{key}"] for x in log if x["step"] == step and f"eval_{key}" in x), None)
                          for log, final in runs]
                if runs and None not in values:
                    means[row] = statistics.mean(values)
            order = sorted(means, key=means.get, reverse=True)
            lines.append(f"| {label(study, kind)} | {step} | " + ", ".join(f"{r} {100 * means[r]:.1f}" for r in order) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot drawing to files (no display needed), imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(values, k=10):
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(curves, study, seeds, key, ylabel, path, k=1, x=None):
    """A panel per set, a line per row: the mean over seeds per step (smoothed over k steps) with
    a band of one standard deviation, against the step or, with `x` (a key every record holds,
    e.g. completions_total), against its mean over seeds at that step. Rows whose logs lack the
    key are left out."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(study.sets), figsize=(5 * len(study.sets), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], study.sets):
        for row in study.rows_for(kind):
            logs = [curves.get((kind, row, s)) for s in seeds]
            if not all(logs) or logs[0][0].get(key) is None:
                continue
            n = min(len(log) for log in logs)
            steps = [[log[i][key] for log in logs if log[i].get(key) is not None] for i in range(n)]  # None: nothing parsed
            mean = smooth([statistics.mean(v) if v else math.nan for v in steps], k)
            sd = smooth([statistics.pstdev(v) if v else math.nan for v in steps], k)
            xs = [statistics.mean(log[i][x] for log in logs) for i in range(n)] if x else range(1, n + 1)
            ax.plot(xs, mean, label=row)
            ax.fill_between(xs, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], alpha=0.2)
        ax.set_title(label(study, kind))
        ax.set_xlabel(x.replace("_", " ") + " (mean over seeds)" if x else "step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0][0].get_lines():
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_curves(curves, keys, path):
    """Every run's per-step numbers (`keys`; empty where a run has none) as one CSV."""
    def write(f):
        f.write("set,row,seed,step," + ",".join(keys) + "\n")
        for (kind, row, seed), log in sorted(curves.items()):
            for r in log:
                values = ["" if r.get(k) is None else f"{r[k]:.4g}" for k in keys]
                f.write(f"{kind},{row},{seed},{r['step']}," + ",".join(values) + "\n")
    write_whole(path, write)


def report(study, name, root, cells, out, wall, header=(), failed=None):
    """results/<name>.md (the table, the contrasts, the plots' names, the cells still missing),
    .json (every finished run's record), _curves.csv (every run's steps) and one PNG per curve."""
    curves, missing = {}, []
    for cell in cells:
        for row in study.rows_for(cell[0]):
            folder = cell_dir(root, cell, row)
            damaged = damaged_eval(folder)
            if damaged or not os.path.exists(os.path.join(folder, "eval.json")):
                missing.append(f"{folder}: {(failed or {}).get(folder, damaged or 'not finished')}")
                continue
            curves[(cell[0], row, cell[1])] = read_run(folder)[1]
    budget = budget_of(curves.values()) if study.equal_completions else None
    records = [record(study, root, (kind, seed), row, budget) for kind, row, seed in curves]
    write_json(records, os.path.join(out, f"{name}.json"), indent=1)
    keys = list(dict.fromkeys([k for k, _, _ in study.curves] + ["reward_mean", "iou_mean", "kl", "loss", "completions_total"]))
    write_curves(curves, keys, os.path.join(out, f"{name}_curves.csv"))
    seeds = sorted({seed for _, seed in cells})
    plots = [(key, ylabel, k, None, f"{name}_{key}.png") for key, ylabel, k in study.curves]
    if budget:  # the same curves against what was sampled
        plots += [(key, ylabel, k, "completions_total", f"{name}_{key}_by_completions.png")
                  for key, ylabel, k in study.curves if key != "completions_sampled"]
    for key, ylabel, k, x, png in plots:
        plot(curves, study, seeds, key, ylabel, os.path.join(out, png), k, x)
    md = [f"# {name}: {len(seeds)} seed(s), metrics in % (mae in grades, box areas as ratios), mean ± std over seeds "
          "(the population SD)", "",
          f"`{' '.join(['python', 'ablate.py'] + sys.argv[1:])}`: {wall / 60:.1f} min of wall time on this "
          "2-core machine (summed over invocations if it was resumed)", *header, "",
          table(study, records, columns(study, records))]
    if study.contrasts:
        md += ["", "Differences paired by seed, in points, mean ± half-width of the 95 % t interval:", "",
               contrast_table(study, records)]
    if study.ranked:
        finals = {cell: json.load(open(os.path.join(cell_dir(root, (cell[0], cell[2]), cell[1]), "eval.json")))
                  for cell in curves}
        md += ["", "Ranking at each evaluation:", "",
               ranking_table(study, {c: (curves[c], finals[c]) for c in curves}, study.ranked)]
    if study.interactions:
        md += ["", "Interactions, paired by seed, in points, mean ± half-width of the 95 % t interval "
               "(seeds on which it is positive):", "", interaction_table(study, records)]
    if budget:
        md += ["", f"## At equal completions sampled ({budget:,})", "",
               "Each row scored at its last evaluation at or before the budget (rows without dynamic sampling "
               "reach it at their last step; SFT samples none and is scored at its end):", "",
               table(study, records, budget_columns(study, records))]
        if study.contrasts:
            md += ["", "Differences at the budget, paired by seed:", "", contrast_table(study, records, "budget_")]
    md += ["", "Plots: " + ", ".join(png for *_, png in plots)]
    if missing:  # the table's '-' cells: runs that failed or have not run (here, or on another machine)
        md += ["", f"Missing ({len(missing)} runs; rerun the same command to run them, or --report once they are done):", ""]
        md += [f"- {m}" for m in missing]
    write_whole(os.path.join(out, f"{name}.md"), lambda f: f.write("\n".join(md) + "\n"))
    print("\n".join(md))
    print(f"wrote {os.path.join(out, name)}.md, .json, _curves.csv and {len(plots)} plots")
    return records


# ----------------------------------------------------------------------------- the command line
ON_ANY_DATA = ("compare", "rules", "loose")  # the studies whose rows start from one model


def parse_args(argv=None):
    """The study's flags, each size checked to be at least 1 (a one-line error otherwise); what
    follows `--` is passed to every run's train.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="compare / rules / loose: a training JSONL instead of the built-in sets")
    p.add_argument("--eval-dataset", help="with --dataset: the JSONL every row is scored on")
    p.add_argument("--model", help="the model the warm start trains from (hub id or folder; default: the tiny one)")
    p.add_argument("--rows", help="only these rows, comma-separated (default: all of the study's)")
    p.add_argument("--gpus", help="GPU ids, comma-separated: one row per GPU (or per --gpus-per-row), queued")
    p.add_argument("--gpus-per-row", type=int, default=None, help="with --gpus: K GPUs per row, under torchrun (default 1)")
    p.add_argument("--print-commands", metavar="FILE", help="write one shell line per run, in order, and run nothing")
    p.add_argument("--report", action="store_true", help="rebuild the table from the run folders there are; run nothing")
    p.add_argument("--report-to", default="none", help="every run's --report-to (tensorboard, wandb), grouped by study")
    p.add_argument("--study", default="compare", choices=tuple(STUDIES))
    p.add_argument("--quick", action="store_true", help="1 seed and a third of the steps")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--init", default=None, help="compare / rules: the model every row starts from "
                                                   "(default: an SFT warm start of --warm-steps, run first)")
    p.add_argument("--warm-steps", type=int, default=2000, help="compare / rules: SFT steps of that warm start")
    p.add_argument("--loose-scale", help=f"loose / sparsity: the warm start's --sft-box-scale (default {LOOSE_SCALE} / {SPARSE_SCALE})")
    p.add_argument("--loose-warm-steps", type=int, default=LOOSE_WARM_STEPS, help="loose / sparsity: SFT steps of its warm start")
    p.add_argument("--steps", type=int, default=250, help="compare / rules / loose: steps of every row")
    p.add_argument("--batch-prompts", type=int, default=4, help="B of GRPO, and the SFT rows' batch")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--vrft-steps", type=int, default=90, help="vrft study: steps of every row")
    p.add_argument("--vrft-warm-steps", type=int, default=150, help="vrft study: SFT warm-start steps")
    p.add_argument("--vrft-grounding-warm", type=int, default=650,
                   help="vrft study, PA_pi: SFT steps before the grounding GRPO stage")
    args = p.parse_args(argv)
    args.extra = extra
    for name in ("dataset", "eval_dataset", "out", "init", "print_commands"):  # the caller's folder, not ours
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.model and os.path.exists(args.model):
        args.model = os.path.abspath(args.model)
    check_gpus(p, args)
    check_outputs(p, args)
    try:  # train.py's own rule, before the warm start it is passed to
        config.parse_box_scale(args.loose_scale)
    except ValueError as e:
        p.error(f"--loose-scale {args.loose_scale!r}: {e}")
    if args.loose_scale and args.study not in ("loose", "sparsity"):
        p.error(f"--loose-scale {args.loose_scale}: only the loose and sparsity studies start from loosened boxes "
                f"(the {args.study} study would ignore it)")
    if args.init and args.study not in ("compare", "rules", "loose", "sparsity", "multi"):
        p.error(f"--init {args.init}: the {args.study} study makes its own starts")
    if args.dataset and args.study not in ON_ANY_DATA:
        p.error(f"--dataset: the {args.study} study runs on its built-in sets; {', '.join(ON_ANY_DATA)} take any data")
    if bool(args.dataset) != bool(args.eval_dataset):
        p.error("--dataset and --eval-dataset go together: the rows train on one and are scored on the other")
    for flag, path in (("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or folder")
    rows = [r.strip() for r in (args.rows or "").split(",") if r.strip()]
    if args.rows is not None and not rows:
        p.error(f"--rows {args.rows!r}: names no row (the {args.study} study's: {', '.join(STUDIES[args.study].rows)})")
    unknown = [r for r in rows if r not in STUDIES[args.study].rows]
    if unknown:
        p.error(f"--rows {args.rows}: {', '.join(unknown)} not in the {args.study} study ({', '.join(STUDIES[args.study].rows)})")
    for name in ("seeds", "jobs", "steps", "warm_steps", "loose_warm_steps", "batch_prompts", "eval_n", "save_every", "vrft_steps",
                 "vrft_warm_steps", "vrft_grounding_warm"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    try:
        parse_report_to(args.report_to)
    except ValueError as e:
        p.error(f"--report-to {e}")
    if args.quick:
        args.seeds, args.steps = 1, max(args.steps // 3, 1)
    return args


def cuda_devices():
    import torch  # only here: a study on CPUs never loads it
    return torch.cuda.device_count()


def check_gpus(p, args):
    """--gpus: distinct GPU ids this machine has; --gpus-per-row only with them, a divisor's worth."""
    if args.gpus_per_row is not None and not args.gpus:
        p.error(f"--gpus-per-row {args.gpus_per_row}: goes with --gpus (the GPUs a row's processes share)")
    args.gpus_per_row = args.gpus_per_row or 1
    if args.gpus is None:
        return
    ids = [g.strip() for g in args.gpus.split(",") if g.strip()]
    bad = [g for g in ids if not g.isdigit()]
    if not ids or bad:
        p.error(f"--gpus {args.gpus}: comma-separated GPU ids (0, 1, ...), not {', '.join(bad) or 'nothing'}")
    twice = sorted({g for g in ids if ids.count(g) > 1})
    if twice:
        p.error(f"--gpus {args.gpus}: GPU {', '.join(twice)} named twice (two rows would share it)")
    if not 1 <= args.gpus_per_row <= len(ids):
        p.error(f"--gpus-per-row {args.gpus_per_row}: between 1 and the {len(ids)} GPU(s) of --gpus")
    if not args.print_commands:  # the commands may run elsewhere; here the rows run on this machine's GPUs
        count = cuda_devices()
        missing = [g for g in ids if int(g) >= count]
        if missing:
            p.error(f"--gpus {args.gpus}: this machine has {count} CUDA device(s); no GPU {', '.join(missing)}")
    args.gpus = ids


def check_outputs(p, args):
    """--out a folder (or to be made under one), --print-commands a file in an existing folder."""
    for flag, path, kind in (("--out", args.out, "folder"), ("--print-commands", args.print_commands, "file")):
        if not path:
            continue
        parent = os.path.dirname(path)
        while kind == "folder" and parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)  # --out may be several levels new
        if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
            p.error(f"{flag} {path}: a file, not a folder")
        if kind == "file" and os.path.isdir(path):
            p.error(f"{flag} {path}: a folder; give the file to write the commands into")
        if not os.path.isdir(parent):
            p.error(f"{flag} {path}: {parent} is not a folder")
        if not os.access(parent if not os.path.exists(path) else path, os.W_OK):
            p.error(f"{flag} {path}: not writable here (read-only)")


# What a row's own train.py flags are set by, for the one line that refuses them after `--`.
STUDY_FLAG = {"steps": "--steps", "seed": "--seeds", "dataset": "--dataset", "eval_dataset": "--eval-dataset",
              "init": "--init", "batch_prompts": "--batch-prompts", "eval_n": "--eval-n", "save_every": "--save-every",
              "out": "--out", "resume": "rerunning the same command", "report_to": "--report-to"}


def check_extra(stages, extra):
    """The flags after `--` may add to a row's train.py flags, never replace one the study sets."""
    given = config.parse_args(extra) if extra else {}
    for run_dir, flags in (r for stage in stages for r in stage):
        clash = sorted((set(config.parse_args(flags)) | {"out", "resume"}) & set(given))
        if clash:
            name = clash[0]
            raise SystemExit(f"error: -- --{name.replace('_', '-')}: the study sets it for every run "
                             f"({os.path.basename(run_dir)}: {STUDY_FLAG.get(name, 'what the rows compare')}); "
                             "leave it out of the flags after --")


def study_of(args):
    """The study as asked: its rows (--rows), its sets (one, "data", with --dataset)."""
    study = STUDIES[args.study]
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",")]
        study = dataclasses.replace(study, rows={r: f for r, f in study.rows.items() if r in rows})
    if args.dataset:
        study = dataclasses.replace(study, sets=("data",), data=args.dataset)
    return study


def planned(study, args, root, name, cells):
    """The study's stages with only its rows (and their warm starts), each run given the extra flags
    and, with --report-to, the trackers and the study's name as their group (W&B's group; the
    TensorBoard folders lie side by side under the study's run folder)."""
    dropped = set(STUDIES[args.study].rows) - set(study.rows)  # the rows --rows leaves out; warm starts stay
    report = ["--report-to", args.report_to, "--run-group", name] if args.report_to != "none" else []
    stages = [[(d, f + report) for d, f in stage if os.path.basename(d) not in dropped]
              for stage in study.stages(args, root, cells)]
    check_extra(stages, args.extra)
    return [[(d, f + args.extra) for d, f in stage] for stage in stages]


def main(argv=None):
    args = parse_args(argv)
    study = study_of(args)
    name = args.study + ("-quick" if args.quick else "")
    root = os.path.join(args.out, "runs", name)
    if args.report and not os.path.isdir(root):
        raise SystemExit(f"error: --report: no {name} study in {args.out} (no runs/{name}/ there); nothing written")
    cells = [(kind, seed) for kind in study.sets
             for seed in range(args.seeds if args.quick or not study.seeds else study.seeds[kind])]
    stages = planned(study, args, root, name, cells)  # a refusal here leaves no folder behind
    os.makedirs(root, exist_ok=True)
    try:
        with Lock(root, "ablate.py"):  # one command at a time writes a study: no row deleted under another's feet
            return run_study(args, study, name, root, cells, stages)
    except RunError as e:
        raise SystemExit(f"error: {e}")


def run_study(args, study, name, root, cells, stages):
    """Print the commands, or run the rows and table them, or (--report) table the rows there are."""
    if args.print_commands:
        return print_commands(stages, args, args.print_commands)
    runs = sum(map(len, stages))
    print(f"ablate.py --study {args.study}: {len(study.rows)} rows on {', '.join(label(study, k) for k in study.sets)}, "
          f"{len({s for _, s in cells})} seed(s); {runs} runs in {len(stages)} stage(s) under {root}, "
          f"{'none run (--report)' if args.report else f'{args.jobs} at a time; finished ones are kept'}; "
          f"the report: {os.path.join(args.out, name)}.md", flush=True)
    spent, failed = (0.0, {}) if args.report else run_stages(stages, args)
    header = [f"Data {args.dataset} (scored on {args.eval_dataset})" if args.dataset else "",
              f"Warm start from {args.model}" if args.model else "", f"Start: {args.init}" if args.init else "",
              f"Extra train.py flags of every run: `{' '.join(args.extra)}`" if args.extra else ""]
    records = report(study, name, root, cells, args.out, wall_so_far(root, spent), [h for h in header if h], failed)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed or could not start; the others finished and "
                         f"{args.out}/{name}.md shows the table without them: " + "; ".join(f"{d}: {w}" for d, w in failed.items()))
    return records


if __name__ == "__main__":
    main()
