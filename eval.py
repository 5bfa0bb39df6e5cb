"""Evaluate a grounding model: A@0.5, A@0.8, pseudo-mAP, mIoU, parse failures (METHOD.md section 7).

    python eval.py --model runs/x/final --dataset synth:derm --out metrics.json --save-vis 8

Greedy decoding, one box per sample, the training prompt and parser; an unparsable answer is IoU 0.
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

from data import BOX_FORMATS, load_dataset, to_rgb
import dist
from grpo import sample_groups
from reward import iou, parse_box, to_image_frame

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
    max_new_tokens = max_new_tokens or (24 if vlm.is_tiny else 256)
    vlm.model.eval()
    preds = []
    bar = tqdm(range(0, len(samples), batch_size), desc=desc, leave=False, disable=not dist.is_main())
    for start in bar:
        chunk = samples[start:start + batch_size]
        out = sample_groups(vlm, [s.image() for s in chunk], [s.query for s in chunk], 1,
                            max_new_tokens=max_new_tokens, greedy=True, together=dist.is_sharded(vlm.model))
        for s, text, in_size in zip(chunk, out.texts, vlm.input_sizes(out.batch)):
            box = to_image_frame(parse_box(text), vlm.coord, s.image_size, in_size)
            preds.append({"text": text, "box": box, "iou": iou(box, s.box), "parse_fail": box is None})
        bar.set_postfix(mIoU=sum(p["iou"] for p in preds) / len(preds))
    return preds


def evaluate(vlm, samples, batch_size=32, max_new_tokens=None):
    """(metrics, predictions): overall metrics plus a `by_size` breakdown (METHOD.md section 7)."""
    preds = predict(vlm, samples, batch_size, max_new_tokens)
    metrics = summarize([p["iou"] for p in preds], [p["parse_fail"] for p in preds])
    metrics["by_size"] = {}
    for name, _, _ in SIZE_BINS:
        idx = [i for i, s in enumerate(samples) if size_bin(s) == name]
        metrics["by_size"][name] = summarize([preds[i]["iou"] for i in idx],
                                             [preds[i]["parse_fail"] for i in idx])
    return metrics, preds


def format_table(metrics):
    """Plain-text table: one row overall, one per size bin, metrics in percent."""
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
    from model import load_vlm
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
        samples = load_dataset(a.dataset, "test", a.image_root, a.skip_invalid, a.n, box_format=a.box_format)
        vlm = load_vlm(a.model, device, a.precision, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    except ValueError as e:  # DataError included
        raise SystemExit(f"error: {e}")
    metrics, preds = evaluate(vlm, samples, a.batch_size, a.max_new_tokens)
    print(format_table(metrics))
    if a.out:
        write_json(metrics, a.out)
    if a.save_vis:
        folder = os.path.splitext(a.out)[0] + "_vis" if a.out else "vis"
        save_visualisations(samples, preds, a.save_vis, folder)
        print(f"wrote {min(a.save_vis, len(samples))} images to {folder}/")


if __name__ == "__main__":
    main()
