"""Evaluate a trained model on its task's metrics (tasks.py, read from the model's config.json):
a grounding model by A@0.5, A@0.8, pseudo-mAP, mIoU and parse failures (METHOD.md section 7); a
classifier by accuracy, macro-F1, and on ordinal grades QWK and mean absolute grade error, plus a
confusion-matrix PNG (section 10).

    python eval.py --model runs/x/final --dataset synth:derm --out metrics.json --save-vis 8

Greedy decoding, the training prompt and parser; an unparsable answer is IoU 0. A model trained on
several boxes per query is scored by F1@0.5, F1@0.8, soft F1, matched IoU and mAP@0.5 (METHOD.md 7).
`--predictions FILE.jsonl` writes every sample's answer, what was read from it and its scores.
"""
import argparse
import json
import os

from config import BOX_FORMATS, OneLineParser, data_problem, device_problems, model_problem
from files import cannot_write, reason_of, write_json, write_whole


def output_problems(out, predictions):
    """--out and --predictions checked before the evaluation: each a file that can be written (its
    missing folders are made when it is), and not the same file."""
    problems = [f"{flag} {path}: {reason}" for flag, path in (("--out", out), ("--predictions", predictions))
                if path and (reason := cannot_write(path))]
    if out and predictions and os.path.abspath(out) == os.path.abspath(predictions):
        problems.append(f"--out and --predictions both name {out}: the predictions would overwrite the metrics")
    return problems


def parse_args(argv=None):
    """The flags, each checked before anything loads (before torch, run as a command): one line
    per mistake."""
    p = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or 'tiny'")
    p.add_argument("--dataset", required=True, help="JSONL path or synth:KIND (test split by default)")
    p.add_argument("--image-root", default=None,
                   help="folder image paths are relative to (default: the JSONL's)")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records instead of stopping")
    p.add_argument("--box-format", default="xyxy", choices=sorted(BOX_FORMATS), help="what the JSONL boxes hold")
    p.add_argument("--n", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the model's training run's (else 24 tiny, 64 tiny classifier, 256)")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "bf16-mixed", "fp32"),
                   help="auto: bf16-mixed on CUDA, fp32 on CPU")
    p.add_argument("--save-vis", type=int, default=0, help="write N images with GT and predicted boxes")
    p.add_argument("--sample", type=int, default=0, metavar="G",
                   help="grounding: also sample G completions per image at --temperature and report hit rates "
                        "and all-equal groups at each tau (what the curriculum will see)")
    p.add_argument("--temperature", type=float, default=0.9, help="with --sample: the rollout temperature")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="write every sample's line here: its image and query, the answer, what was read from it "
                        "(boxes in original-image pixels, or the class), the truth and the scores (the matching's "
                        "IoUs with several boxes)")
    a = p.parse_args(argv)
    lowest = {"n": 1, "batch_size": 1, "max_new_tokens": 1, "save_vis": 0, "min_pixels": 28 * 28,
              "max_pixels": 28 * 28, "sample": 0, "threads": 0}
    problems = [f"--{k.replace('_', '-')} {getattr(a, k)}: must be >= {lo}" for k, lo in lowest.items()
                if getattr(a, k) is not None and getattr(a, k) < lo]
    problems += device_problems(a.device)
    problems += output_problems(a.out, a.predictions)  # said now, not after the evaluation
    problems += model_problem("--model", a.model) + data_problem("--dataset", a.dataset)
    if a.image_root and not os.path.isdir(a.image_root):
        problems.append(f"--image-root {a.image_root}: no such folder")
    if a.sample == 1 or not 0 < a.temperature <= 10:
        problems.append(f"--sample {a.sample} --temperature {a.temperature}: a group needs G >= 2 and T in (0, 10]")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
    return a


if __name__ == "__main__":
    parse_args()  # a flag or path mistake is said before torch loads, in a second
import torch
from tqdm import tqdm

import dist
import tasks
from data import GROUNDING_KINDS, SYNTH_LABELS, load_class_dataset, load_dataset, several_boxes, synth_spec, to_rgb
from grpo import sample_groups
from model import FRAMES, load_vlm


def token_budget(vlm, task, given=None):
    """Completion length: `given`, else the length the model's run trained to, else the task's default."""
    return given or getattr(vlm.model.config, "medloc_max_new_tokens", None) or task.max_new_tokens(vlm.is_tiny)


@torch.no_grad()
def predict(vlm, task, samples, batch_size=32, max_new_tokens=None, desc="eval"):
    """Greedy prediction per sample, read by the task (a box in original pixels and its IoU, or a class)."""
    max_new_tokens = token_budget(vlm, task, max_new_tokens)
    vlm.model.eval()
    finished = dist.all_done if dist.is_sharded(vlm.model) else torch.all  # a split model decodes on every rank
    preds = []
    bar = tqdm(range(0, len(samples), batch_size), desc=desc, leave=False, disable=not dist.is_main())
    for start in bar:
        chunk = samples[start:start + batch_size]
        with dist.gathered(vlm.model):
            out = sample_groups(vlm, [s.image() for s in chunk], [task.prompt(s) for s in chunk], 1,
                                max_new_tokens=max_new_tokens, greedy=True, finished=finished)
        preds += [task.predict(text, s, in_size) for s, text, in_size in zip(chunk, out.texts, vlm.input_sizes(out.batch))]
        bar.set_postfix(task.postfix(preds))
    return preds


HIT_THRESHOLDS = (0.3, 0.45, 0.5, 0.6, 0.7, 0.8)


@torch.no_grad()
def sampled_hits(vlm, task, samples, group_size, temperature=0.9, max_new_tokens=None, batch_size=8, seed=0):
    """What the curriculum's window sees (METHOD.md 6): G completions per image sampled as in
    training, their mean IoU and the mean hit at each tau of HIT_THRESHOLDS (1[IoU >= tau]; with
    several boxes the F1 at tau, and the soft F1 as the IoU), and the fraction of groups whose
    rewards at that tau would all be equal (no gradient)."""
    max_new_tokens = token_budget(vlm, task, max_new_tokens)
    torch.manual_seed(seed)
    preds = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        out = sample_groups(vlm, [s.image() for s in chunk], [task.prompt(s) for s in chunk], group_size,
                            temperature, max_new_tokens)
        sizes = [size for size in vlm.input_sizes(out.batch) for _ in range(group_size)]
        rows = [s for s in chunk for _ in range(group_size)]
        preds += [task.predict(text, s, size) for text, s, size in zip(out.texts, rows, sizes)]
    result = {"mean_iou": sum(p["iou"] for p in preds) / len(preds), "completions": len(preds)}
    for t in HIT_THRESHOLDS:
        hits = [task.hit(p, t) for p in preds]
        groups = [hits[i:i + group_size] for i in range(0, len(hits), group_size)]
        result[f"hit@{t}"] = sum(hits) / len(hits)
        result[f"all_equal@{t}"] = sum(len(set(g)) == 1 for g in groups) / len(groups)
    return result


def evaluate(vlm, task, samples, batch_size=32, max_new_tokens=None):
    """(metrics, predictions): the task's metrics (METHOD.md section 7, or 10 for a classifier)."""
    preds = predict(vlm, task, samples, batch_size, max_new_tokens)
    return task.metrics(samples, preds), preds


def save_visualisations(samples, preds, n, folder):
    """N PNGs at a readable size (the longer side brought into 512-1024 pixels): the true boxes in
    green, the predicted ones in red with their IoU written on them (with several, each box's best
    IoU with a true box), and a legend above the image with the sample's score."""
    from PIL import Image, ImageDraw
    from reward import iou
    os.makedirs(folder, exist_ok=True)
    for i, (s, p) in enumerate(list(zip(samples, preds))[:n]):
        img = to_rgb(s.image())
        scale = min(max(512 / max(img.size), 1.0), 1024 / max(img.size))
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        canvas = Image.new("RGB", (img.width, img.height + 24), "white")
        canvas.paste(img, (0, 24))
        draw = ImageDraw.Draw(canvas)

        def at(box):  # original pixels -> the canvas's, below the legend
            return [v * scale + (24 if k % 2 else 0) for k, v in enumerate(box)]
        for box in s.truth():
            draw.rectangle(at(box), outline=(0, 200, 0), width=3)
        drawn = [b for b in p.get("boxes", [p.get("box")]) if b is not None and b[2] > b[0] and b[3] > b[1]]
        for box in drawn:
            x1, y1, _, _ = at(box)
            draw.rectangle(at(box), outline=(230, 0, 0), width=3)
            draw.text((x1 + 4, y1 + 3), f"IoU {max(iou(box, t) for t in s.truth()):.2f}", fill=(230, 0, 0))
        score = "no box read from the answer" if p["parse_fail"] else f"IoU {p['iou']:.2f}"
        draw.text((6, 6), f"green: truth ({len(s.truth())})   red: prediction ({len(drawn)})   {score}", fill=(0, 0, 0))
        canvas.save(os.path.join(folder, f"{i:04d}_iou{p['iou']:.2f}.png"))


def write_predictions(path, lines):
    """The lines of --predictions as JSONL, whole or not at all."""
    write_whole(path, lambda f: f.writelines(json.dumps(line) + "\n" for line in lines))


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        labels = tasks.saved_labels(a.model)  # before any weights: the data must fit the model
        kind = synth_spec(a.dataset, "test")[0] if a.dataset.startswith("synth:") else None
        if kind in SYNTH_LABELS and not labels or kind in GROUNDING_KINDS and labels:
            names = ("grounding", "classification") if not labels else ("classification", "grounding")
            raise SystemExit(f"error: {a.model} is a {names[0]} model and {a.dataset} a {names[1]} set")
        if labels:
            samples = load_class_dataset(a.dataset, labels, "test", a.image_root, a.skip_invalid, a.n)[0]
        else:
            samples = load_dataset(a.dataset, "test", a.image_root, a.skip_invalid, a.n, box_format=a.box_format)
        vlm = load_vlm(a.model, device, a.precision, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
        task = tasks.of_model(vlm, os.path.join(a.model, "config.json"))
    except ValueError as e:  # DataError included
        raise SystemExit(f"error: {e}")
    if a.sample and not task.has_tau:
        raise SystemExit(f"error: --sample {a.sample}: hit rates under tau are for grounding models")
    if task.name == "ground" and several_boxes(samples):
        raise SystemExit(f"error: {a.model} answers one box per query, and {a.dataset} gives several: "
                         "evaluate a model trained on several boxes (--task ground-multi)")
    print(f"eval.py: {a.model} ({vlm.model.config.model_type}; boxes in {FRAMES[vlm.coord]}) on {device}, "
          f"{len(samples):,} records of {a.dataset}")
    metrics, preds = evaluate(vlm, task, samples, a.batch_size, a.max_new_tokens)
    print(f"\n{a.model} on {a.dataset}: {len(samples):,} samples")
    print(task.table(metrics))
    if a.sample:
        metrics["sampled"] = sampled_hits(vlm, task, samples, a.sample, a.temperature, a.max_new_tokens)
        print(f"sampled (G = {a.sample}, T = {a.temperature}): " + ", ".join(
            f"{k} {100 * v:.1f}" for k, v in metrics["sampled"].items() if k != "completions"))
    try:
        write_outputs(a, task, metrics, samples, preds)
    except OSError as e:  # a full disk: said in one line; write_whole leaves no half-written file
        name = str(e.filename or a.out or a.predictions).removesuffix(".tmp")  # the file asked for, not its temp
        raise SystemExit(f"error: cannot write {name} ({reason_of(e)})")


def write_outputs(a, task, metrics, samples, preds):
    """What eval.py was asked to write: the metrics and their plots, the predictions, the images."""
    if a.out:
        write_json(metrics, a.out)
        task.save_plots(metrics, os.path.splitext(a.out)[0])
        print(f"wrote the metrics to {a.out}")
    if a.predictions:
        write_predictions(a.predictions, [task.record(s, pred) for s, pred in zip(samples, preds)])
        print(f"wrote {len(preds)} predictions to {a.predictions}")
    if a.save_vis:
        folder = os.path.splitext(a.out)[0] + "_vis" if a.out else "vis"
        save_visualisations(samples, preds, a.save_vis, folder)
        print(f"wrote {min(a.save_vis, len(samples))} images to {folder}/")


if __name__ == "__main__":
    main()
