"""Evaluate a grounding model: A@0.5, A@0.8, pseudo-mAP, mIoU, parse failures (METHOD.md section 7);
a classifier (trained with --task classify, read from its config): accuracy, macro-F1, and on
ordinal grades QWK and mean absolute grade error, plus a confusion-matrix PNG (section 10).

    python eval.py --model runs/x/final --dataset synth:derm --out metrics.json --save-vis 8

Greedy decoding, one box per sample, the training prompt and parser; an unparsable answer is IoU 0.
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

from data import BOX_FORMATS, KINDS, SYNTH_LABELS, load_class_dataset, load_dataset, to_rgb
import dist
from grpo import sample_groups
from model import default_max_new_tokens
from reward import iou, parse_box, parse_class, to_image_frame

MAP_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]  # 0.50, 0.55, ..., 0.95
# GT box area as a fraction of the image: small < 4 %, medium < 16 %, large otherwise.
SIZE_BINS = (("small", 0.0, 0.04), ("medium", 0.04, 0.16), ("large", 0.16, float("inf")))


def accuracy_at(ious, t):
    """Fraction of samples with IoU >= t (METHOD.md section 7)."""
    return sum(v >= t for v in ious) / len(ious) if len(ious) else 0.0


def pseudo_map(ious):
    """Mean of A@t over t = 0.50, 0.55, ..., 0.95 (METHOD.md section 7)."""
    return sum(accuracy_at(ious, t) for t in MAP_THRESHOLDS) / len(MAP_THRESHOLDS)


def summarize(ious, parse_fail):
    """The metric dict for one set of samples; fractions in [0, 1]."""
    n = len(ious)
    return {"A@0.5": accuracy_at(ious, 0.5), "A@0.8": accuracy_at(ious, 0.8), "mAP": pseudo_map(ious),
            "mIoU": sum(ious) / n if n else 0.0, "parse_fail": sum(parse_fail) / n if n else 0.0, "n": n}


def size_bin(sample):
    W, H = sample.image_size
    x1, y1, x2, y2 = sample.box
    frac = (x2 - x1) * (y2 - y1) / (W * H)
    return next(name for name, lo, hi in SIZE_BINS if lo <= frac < hi)


@torch.no_grad()
def predict(vlm, samples, batch_size=32, max_new_tokens=None, desc="eval"):
    """Greedy prediction per sample: dict with text, box (original pixels or None) and IoU."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(vlm)
    vlm.model.eval()
    preds = []
    bar = tqdm(range(0, len(samples), batch_size), desc=desc, leave=False, disable=not dist.is_main())
    for start in bar:
        chunk = samples[start:start + batch_size]
        out = sample_groups(vlm, [s.image() for s in chunk], [vlm.query_of(s) for s in chunk], 1,
                            max_new_tokens=max_new_tokens, greedy=True, together=dist.is_sharded(vlm.model))
        for s, text, in_size in zip(chunk, out.texts, vlm.input_sizes(out.batch)):
            if vlm.task == "classify":
                preds.append({"text": text, "class": parse_class(text, vlm.labels.names)})
                continue
            box = to_image_frame(parse_box(text), vlm.coord, s.image_size, in_size)
            preds.append({"text": text, "box": box, "iou": iou(box, s.box), "parse_fail": box is None})
        if vlm.task != "classify":
            bar.set_postfix(mIoU=sum(p["iou"] for p in preds) / len(preds))
    return preds


def evaluate(vlm, samples, batch_size=32, max_new_tokens=None):
    """(metrics, predictions): overall metrics plus a `by_size` breakdown (METHOD.md section 7);
    for a classifier accuracy, macro-F1 and, on ordinal grades, QWK and grade error (section 10)."""
    preds = predict(vlm, samples, batch_size, max_new_tokens)
    if vlm.task == "classify":
        return class_metrics([s.label for s in samples], [p["class"] for p in preds], vlm.labels), preds
    metrics = summarize([p["iou"] for p in preds], [p["parse_fail"] for p in preds])
    metrics["by_size"] = {}
    for name, _, _ in SIZE_BINS:
        idx = [i for i, s in enumerate(samples) if size_bin(s) == name]
        metrics["by_size"][name] = summarize([preds[i]["iou"] for i in idx],
                                             [preds[i]["parse_fail"] for i in idx])
    return metrics, preds


# ----------------------------------------------------------------------------- classification
def confusion(true, pred, k):
    """k x k counts, rows the true class, columns the predicted one (unparsed answers: no column)."""
    m = [[0] * k for _ in range(k)]
    for t, p in zip(true, pred):
        if p is not None:
            m[t][p] += 1
    return m


def macro_f1(true, pred, k):
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN); an unparsed answer is a miss of its class."""
    scores = []
    for c in range(k):
        tp = sum(t == c and p == c for t, p in zip(true, pred))
        fp = sum(t != c and p == c for t, p in zip(true, pred))
        fn = sum(t == c and p != c for t, p in zip(true, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / k


def farthest(t, k):
    """The grade farthest from t: what an unparsed answer counts as in QWK and grade error."""
    return 0 if t >= (k - 1) / 2 else k - 1


def qwk(true, pred, k):
    """Quadratic-weighted Cohen's kappa: 1 - sum(w O) / sum(w E), w_ij = (i - j)^2 / (k - 1)^2,
    O the observed grade pairs, E the product of their marginals / n."""
    n = len(true)
    observed = [[0] * k for _ in range(k)]
    for t, p in zip(true, pred):
        observed[t][p] += 1
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    w = [[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)]
    seen = sum(w[i][j] * observed[i][j] for i in range(k) for j in range(k))
    expected = sum(w[i][j] * rows[i] * cols[j] / n for i in range(k) for j in range(k))
    return 1.0 - seen / expected if expected else 1.0


def class_metrics(true, pred, labels):
    """accuracy, macro_f1, parse_fail, n, confusion (K x K, parsed answers) and unparsed (per true
    class); with ordinal labels also qwk and mae (grades)."""
    k, n = len(labels.names), len(true)
    m = {"accuracy": sum(t == p for t, p in zip(true, pred)) / n, "macro_f1": macro_f1(true, pred, k),
         "parse_fail": sum(p is None for p in pred) / n, "n": n, "classes": labels.names,
         "confusion": confusion(true, pred, k),
         "unparsed": [sum(p is None for t, p in zip(true, pred) if t == c) for c in range(k)]}
    if labels.ordinal:
        graded = [farthest(t, k) if p is None else p for t, p in zip(true, pred)]
        m["qwk"] = qwk(true, graded, k)
        m["mae"] = sum(abs(t - p) for t, p in zip(true, graded)) / n
    return m


def save_confusion(metrics, path):
    """The confusion matrix as a PNG (counts in the cells), unparsed answers as a last column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = metrics["classes"]
    m = [row + [u] for row, u in zip(metrics["confusion"], metrics["unparsed"])]
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(names), 1 + 0.8 * len(names)))
    ax.imshow(m, cmap="Blues")
    top = max(max(row) for row in m)
    for i, row in enumerate(m):
        for j, v in enumerate(row):  # white on the dark cells
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(names) + 1), names + ["unparsed"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(metrics):
    """Plain-text table: one row overall, one per size bin, metrics in percent."""
    if "accuracy" in metrics:  # a classifier's
        cols = [c for c in ("accuracy", "macro_f1", "qwk", "parse_fail") if c in metrics]
        extra = f"{metrics['mae']:>12.3f}" if "mae" in metrics else ""
        return (f"{'n':>6}" + "".join(f"{c:>12}" for c in cols) + (f"{'mae':>12}" if extra else "") + "\n"
                + f"{metrics['n']:>6}" + "".join(f"{100 * metrics[c]:>12.2f}" for c in cols) + extra)
    cols = ("A@0.5", "A@0.8", "mAP", "mIoU", "parse_fail")
    rows = [("all", metrics)] + [(k, v) for k, v in metrics["by_size"].items()]
    lines = [f"{'subset':<8}{'n':>6}" + "".join(f"{c:>12}" for c in cols)]
    for name, m in rows:
        lines.append(f"{name:<8}{m['n']:>6}" + "".join(f"{100 * m[c]:>12.2f}" for c in cols))
    return "\n".join(lines)


def save_visualisations(samples, preds, n, folder):
    """N PNGs with the GT box (green) and the predicted box (red) drawn on the original image."""
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes
    os.makedirs(folder, exist_ok=True)
    for i, (s, p) in enumerate(list(zip(samples, preds))[:n]):
        boxes, colors = [s.box], ["lime"]
        box = p["box"]
        if box is not None and box[2] > box[0] and box[3] > box[1]:  # drawable prediction
            boxes.append(box)
            colors.append("red")
        img = pil_to_tensor(to_rgb(s.image()))
        drawn = draw_bounding_boxes(img, torch.tensor(boxes, dtype=torch.float32), colors=colors, width=2)
        to_pil_image(drawn).save(os.path.join(folder, f"{i:04d}_iou{p['iou']:.2f}.png"))


def write_json(obj, path):
    """Write JSON atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    from config import device_problems
    from model import load_vlm, saved_task
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or 'tiny'")
    p.add_argument("--dataset", required=True, help="JSONL path or synth:KIND (test split by default)")
    p.add_argument("--image-root", default=None,
                   help="folder image paths are relative to (default: the JSONL's)")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records instead of stopping")
    p.add_argument("--box-format", default="xyxy", choices=sorted(BOX_FORMATS), help="what the JSONL boxes hold")
    p.add_argument("--n", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 (tiny) or 256")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "bf16-mixed", "fp32"),
                   help="auto: bf16-mixed on CUDA, fp32 on CPU")
    p.add_argument("--save-vis", type=int, default=0, help="write N images with GT and predicted boxes")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    a = p.parse_args(argv)
    lowest = {"n": 1, "batch_size": 1, "max_new_tokens": 1, "save_vis": 0, "min_pixels": 28 * 28,
              "max_pixels": 28 * 28}
    problems = [f"--{k.replace('_', '-')} {getattr(a, k)}: must be >= {lo}" for k, lo in lowest.items()
                if getattr(a, k) is not None and getattr(a, k) < lo]
    problems += device_problems(a.device)
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        task, labels = saved_task(a.model)
        kind = a.dataset.split(":")[1] if a.dataset.startswith("synth:") else None
        if kind in SYNTH_LABELS and task == "ground" or kind in KINDS + ("mix",) and task == "classify":
            tasks = ("grounding", "classification") if task == "ground" else ("classification", "grounding")
            raise SystemExit(f"error: {a.model} is a {tasks[0]} model and {a.dataset} a {tasks[1]} set")
        if task == "classify":
            samples = load_class_dataset(a.dataset, labels, "test", a.image_root, a.skip_invalid, a.n)[0]
        else:
            samples = load_dataset(a.dataset, "test", a.image_root, a.skip_invalid, a.n, box_format=a.box_format)
        vlm = load_vlm(a.model, device, a.precision, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    except ValueError as e:  # DataError included
        raise SystemExit(f"error: {e}")
    metrics, preds = evaluate(vlm, samples, a.batch_size, a.max_new_tokens)
    print(format_table(metrics))
    if a.out:
        write_json(metrics, a.out)
        if vlm.task == "classify":
            save_confusion(metrics, os.path.splitext(a.out)[0] + "_confusion.png")
    if a.save_vis:
        folder = os.path.splitext(a.out)[0] + "_vis" if a.out else "vis"
        save_visualisations(samples, preds, a.save_vis, folder)
        print(f"wrote {min(a.save_vis, len(samples))} images to {folder}/")


if __name__ == "__main__":
    main()
