"""The two tasks as objects: what the prompt says, what the SFT target is, how completions are
rewarded, what a step logs, and how a model is scored on a test set.

- `Grounding` (MedLoc-R1, METHOD.md sections 3, 4 and 7): one box per image and query, rewarded
  under the schedule's threshold tau; scored by A@0.5, A@0.8, pseudo-mAP and mIoU.
- `MultiGrounding` (section 4.2): several boxes per query, matched one to one; F1 at tau, the
  soft F1, mAP@0.5.
- `Classification` (VRFT-Aug, section 10): one class per image, among `Labels`; rewarded by
  R_acc, R_format, R_MFRS and R_recite; scored by accuracy, macro-F1 and, on grades, QWK.

train.py and eval.py call these methods and never ask which task they run. `of_config` rebuilds a
saved model's task from its config.json (`fields` is what the task writes there).
"""
import os
import zlib

from data import labels_from_json
from model import model_config
from reward import (area_ratio, f1_at, from_image_frame, iou, match_boxes, overlaps, parse_box, parse_boxes, parse_class,
                    score_classes, score_completions, score_multi, soft_f1, to_image_frame)

# METHOD.md section 3: the R1 template asks for reasoning, then the answer.
R1_SUFFIX = (" First output the thinking process in <think> </think> tags and then output the final"
             " answer in <answer> </answer> tags. Output the final answer in JSON format.")
# section 10: the classification prompt asks for one option, not a box
R1_CLASS_SUFFIX = (" First output the thinking process in <think> </think> tags and then output the final"
                   " answer, one of the options, in <answer> </answer> tags.")
TEMPLATES = ("r1", "short")


def check_template(template):
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: expected 'r1' or 'short'")


# ----------------------------------------------------------------------------- grounding
MAP_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]  # 0.50, 0.55, ..., 0.95
# GT box area as a fraction of the image: small < 4 %, medium < 16 %, large otherwise.
SIZE_BINS = (("small", 0.0, 0.04), ("medium", 0.04, 0.16), ("large", 0.16, float("inf")))


def answer_text(box, template):
    """The ideal completion for `box` (in the model's frame; rounded to integers), METHOD.md 3."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if template == "r1":
        return (f'<think>The target region is visible in the image.</think>'
                f'<answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>')
    return f"<answer>[{x1},{y1},{x2},{y2}]</answer>"


def loosened(sample, lo, hi):
    """The GT box scaled about its centre by a factor in [lo, hi] drawn from the sample's source (so
    each example keeps its factor from step to step), clipped to the image: a loose-box start."""
    f = lo + (hi - lo) * zlib.crc32(sample.source.encode()) / 2 ** 32
    (x1, y1, x2, y2), (W, H) = sample.box, sample.image_size
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, f * (x2 - x1) / 2, f * (y2 - y1) / 2
    return (max(0.0, cx - hw), max(0.0, cy - hh), min(float(W), cx + hw), min(float(H), cy + hh))


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


class Grounding:
    """MedLoc-R1's task: a box for the query, in the model's coordinate frame `coord`."""
    name = "ground"
    has_tau = True                     # rewards depend on the curriculum's threshold
    progress = ("hit_rate", "hit")     # the step statistic the progress bar averages, and its label

    def __init__(self, template, coord, reward="threshold", w_fmt=1.0, box_scale=None):
        check_template(template)
        self.template, self.coord, self.reward, self.w_fmt = template, coord, reward, w_fmt
        self.box_scale = box_scale  # (lo, hi): SFT targets loosened (--sft-box-scale), else the GT box

    def max_new_tokens(self, tiny):
        return 24 if tiny else 256  # the tiny model's answers are short

    def fields(self):
        return {"medloc_task": self.name}

    def prompt(self, sample):
        """The user text of METHOD.md section 3."""
        return sample.query + (R1_SUFFIX if self.template == "r1" else "")

    def sft_answer(self, sample, i, input_size):
        """The GT box as the model should write it (in the frame of its resized input); with
        --sft-box-scale, that box scaled about its centre by the sample's own factor."""
        box = loosened(sample, *self.box_scale) if self.box_scale else sample.box
        return answer_text(from_image_frame(box, self.coord, sample.image_size, input_size), self.template)

    def rewards(self, texts, samples, input_sizes, tau):
        """Reward columns of the completions (one sample and input size per completion), METHOD.md 4."""
        return score_completions(texts, [s.box for s in samples], [s.image_size for s in samples], input_sizes,
                                 self.coord, tau, self.reward, self.template, self.w_fmt)

    def step_stats(self, scores, tau):
        hit_tau = 0.5 if tau is None else tau  # Raw-IoU has no tau: report hits at 0.5
        area = scores["area"][~scores["area"].isnan()]  # the parsed boxes' area over the GT's
        return {"hit_rate": (scores["iou"] >= hit_tau).float().mean().item(), "iou_mean": scores["iou"].mean().item(),
                "box_area_ratio": area.mean().item() if len(area) else None}

    def predict(self, text, sample, input_size):
        """A greedy answer read back in original-image pixels (METHOD.md 2): box, IoU, parse failure."""
        box = to_image_frame(parse_box(text), self.coord, sample.image_size, input_size)
        return {"text": text, "box": box, "iou": iou(box, sample.box), "parse_fail": box is None}

    @staticmethod
    def hit(pred, tau):
        """A predicted answer's hit at tau, what the threshold reward gives it (METHOD.md 4, 6)."""
        return float(pred["iou"] >= tau)

    @staticmethod
    def record(sample, pred):
        """One line of eval.py --predictions: the sample, the answer, what was read from it (boxes in
        original-image pixels) and its scores; the metrics can be recomputed from these lines."""
        return {"source": sample.source, "image": sample.path, "image_size": list(sample.image_size),
                "query": sample.query, "answer": pred["text"], "truth": [list(b) for b in sample.truth()],
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in pred.items() if k != "text"}}

    def postfix(self, preds):
        return {"mIoU": sum(p["iou"] for p in preds) / len(preds)}

    def metrics(self, samples, preds):
        """METHOD.md section 7, overall and by GT box size."""
        metrics = summarize([p["iou"] for p in preds], [p["parse_fail"] for p in preds])
        areas = [a for a in (area_ratio(p["box"], s.box) for p, s in zip(preds, samples)) if a is not None]
        metrics["box_area_ratio"] = sum(areas) / len(areas) if areas else None  # > 1: looser than the truth
        metrics["by_size"] = {}
        for name, _, _ in SIZE_BINS:
            idx = [i for i, s in enumerate(samples) if size_bin(s) == name]
            metrics["by_size"][name] = summarize([preds[i]["iou"] for i in idx], [preds[i]["parse_fail"] for i in idx])
        return metrics

    @staticmethod
    def table(metrics):
        """Plain-text table: one row overall, one per size bin, metrics in percent."""
        cols = ("A@0.5", "A@0.8", "mAP", "mIoU", "parse_fail")
        rows = [("all", metrics)] + [(k, v) for k, v in metrics["by_size"].items()]
        lines = [f"{'subset':<8}{'n':>6}" + "".join(f"{c:>12}" for c in cols)]
        for name, m in rows:
            lines.append(f"{name:<8}{m['n']:>6}" + "".join(f"{100 * m[c]:>12.2f}" for c in cols))
        return "\n".join(lines)

    def save_plots(self, metrics, stem):
        pass  # eval.py --save-vis draws the boxes themselves


# ----------------------------------------------------------------------------- several boxes
R1_MULTI_SUFFIX = (" First output the thinking process in <think> </think> tags and then output the final"
                   " answer in <answer> </answer> tags: a JSON list with one {\"bbox_2d\": [x1, y1, x2, y2]}"
                   " object per finding.")


def boxes_text(boxes, template):
    """The ideal completion for several boxes (in the model's frame, rounded), METHOD.md 3: Qwen's
    JSON list of {"bbox_2d": [...]} objects (r1), or a bare list of lists (short)."""
    rounded = [[int(round(v)) for v in box] for box in boxes]
    if template == "r1":
        listed = ", ".join(f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}' for x1, y1, x2, y2 in rounded)
        return f"<think>The findings are visible in the image.</think><answer>[{listed}]</answer>"
    return "<answer>[" + ",".join(f"[{x1},{y1},{x2},{y2}]" for x1, y1, x2, y2 in rounded) + "]</answer>"


def ap50(pred, true):
    """A per-sample AP at IoU 0.5 without confidences, this project's (METHOD.md 7 says how RadVLM's
    and COCO's differ): the predictions in the
    order written, each a true positive when the unmatched true box it overlaps most has IoU >= 0.5
    (greedy), AP = sum over true positives of precision at that rank / the number of true boxes.
    An empty prediction or truth scores 0."""
    if not pred or not true:
        return 0.0
    free, hits, total = list(true), 0, 0.0
    for rank, box in enumerate(pred, 1):
        best = max(free, key=lambda t: iou(box, t), default=None)
        if best is not None and iou(box, best) >= 0.5:
            free.remove(best)
            hits += 1
            total += hits / rank
    return total / len(true)


COCO_RECALLS = [k / 100 for k in range(101)]  # COCOeval's recThrs


def coco_ap50(pred, true):
    """COCO's AP at IoU 0.5 of one image, as pycocotools' COCOeval computes it for one category
    (tested against it): the predictions ranked in the order written (no confidences; at most 100,
    its maxDets), each taking the not yet matched true box of highest IoU >= 0.5 (the later of
    equals); the precision made non-increasing from the right and read at the 101 recalls 0, 0.01,
    ..., 1 (0 beyond the last recall reached), averaged. An empty prediction scores 0."""
    if not true:
        raise ValueError("COCO's AP is undefined for an image without true boxes")
    taken, hits = set(), []
    for box in pred[:100]:
        best, m = 0.5, None
        for g, t in enumerate(true):
            if g not in taken and iou(box, t) >= best:
                best, m = iou(box, t), g
        if m is not None:
            taken.add(m)
        hits.append(m is not None)
    recall, precision, tp = [], [], 0
    for k, hit in enumerate(hits, 1):
        tp += hit
        recall.append(tp / len(true))
        precision.append(tp / k)
    for k in range(len(precision) - 1, 0, -1):
        precision[k - 1] = max(precision[k - 1], precision[k])
    reached = [next((precision[k] for k, r in enumerate(recall) if r >= level), 0.0) for level in COCO_RECALLS]
    return sum(reached) / len(reached)


def summarize_multi(preds):
    """F1@0.5, F1@0.8, soft F1, mean matched IoU, mAP@0.5 and parse failures over samples (METHOD.md 7)."""
    n = len(preds)
    mean = lambda key: sum(p[key] for p in preds) / n if n else 0.0  # noqa: E731
    matched = [v for p in preds for v in p["matched"]]
    return {"F1@0.5": mean("f1@0.5"), "F1@0.8": mean("f1@0.8"), "soft_F1": mean("soft_f1"),
            "matched_IoU": sum(matched) / len(matched) if matched else 0.0, "mAP@0.5": mean("ap50"),
            "COCO_AP@0.5": mean("coco_ap50"), "parse_fail": mean("parse_fail"), "n": n}


class MultiGrounding(Grounding):
    """Several boxes per query (METHOD.md 4.2): the answer is a list of boxes, matched one to one to
    the true boxes by the largest total IoU; rewarded by F1 at the curriculum's tau (or the soft
    F1, Raw-IoU's analogue); scored by F1@0.5, F1@0.8, soft F1, matched IoU and mAP@0.5. With one
    box on each side every number is the one-box task's."""
    name = "ground-multi"

    def __init__(self, template, coord, reward="threshold", w_fmt=1.0):
        if reward not in ("threshold", "iou"):
            raise ValueError(f"--reward {reward} has no several-box form: threshold (F1 at tau) or iou (soft F1)")
        super().__init__(template, coord, reward, w_fmt)

    def max_new_tokens(self, tiny):
        return 64 if tiny else 512  # the tiny model's three boxes: up to 52 tokens

    def prompt(self, sample):
        return sample.query + (R1_MULTI_SUFFIX if self.template == "r1" else "")

    def sft_answer(self, sample, i, input_size):
        return boxes_text([from_image_frame(b, self.coord, sample.image_size, input_size) for b in sample.truth()],
                          self.template)

    def rewards(self, texts, samples, input_sizes, tau):
        return score_multi(texts, [s.truth() for s in samples], [s.image_size for s in samples], input_sizes,
                           self.coord, tau, self.reward, self.template, self.w_fmt)

    def step_stats(self, scores, tau):
        return {"hit_rate": scores["hit"].mean().item(), "iou_mean": scores["iou"].mean().item(),
                "boxes_mean": scores["boxes"].mean().item()}

    def predict(self, text, sample, input_size):
        """The answer's boxes in original pixels, the matching's IoUs and the sample's scores."""
        raw = parse_boxes(text)
        boxes = [to_image_frame(b, self.coord, sample.image_size, input_size) for b in raw or []]
        truth = sample.truth()
        matched, overlap = match_boxes(boxes, truth), overlaps(boxes, truth)
        P, T = len(boxes), len(truth)
        return {"text": text, "boxes": boxes, "matched": matched, "overlap": overlap, "parse_fail": raw is None,
                "truths": T, "f1@0.5": f1_at(overlap, P, T, 0.5), "f1@0.8": f1_at(overlap, P, T, 0.8),
                "soft_f1": soft_f1(matched, P, T), "ap50": ap50(boxes, truth), "coco_ap50": coco_ap50(boxes, truth),
                "iou": soft_f1(matched, P, T)}  # what the curriculum's margin reads (eval.sampled_hits)

    @staticmethod
    def hit(pred, tau):
        return f1_at(pred["overlap"], len(pred["boxes"]), pred["truths"], tau) if not pred["parse_fail"] else 0.0

    @staticmethod
    def record(sample, pred):
        line = Grounding.record(sample, pred)
        line["boxes"] = [list(b) for b in pred["boxes"]]
        return line

    def postfix(self, preds):
        return {"F1@0.5": sum(p["f1@0.5"] for p in preds) / len(preds)}

    def metrics(self, samples, preds):
        """METHOD.md section 7 for several boxes, overall and by the number of true boxes."""
        metrics = summarize_multi(preds)
        counts = sorted({len(s.truth()) for s in samples})
        metrics["by_count"] = {str(k): summarize_multi([p for p, s in zip(preds, samples) if len(s.truth()) == k])
                               for k in counts}
        return metrics

    @staticmethod
    def table(metrics):
        """Plain-text table: one row overall, one per number of true boxes, metrics in percent."""
        cols = ("F1@0.5", "F1@0.8", "soft_F1", "matched_IoU", "mAP@0.5", "COCO_AP@0.5", "parse_fail")
        rows = [("all", metrics)] + [(f"{k} box", v) for k, v in metrics["by_count"].items()]
        lines = [f"{'subset':<8}{'n':>6}" + "".join(f"{c:>13}" for c in cols)]
        for name, m in rows:
            lines.append(f"{name:<8}{m['n']:>6}" + "".join(f"{100 * m[c]:>13.2f}" for c in cols))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- classification
SFT_REASONING = "I compare the options."  # the SFT target's think block for a class


def class_query(question, labels, knowledge):
    """A classification question with its options and, for PA_p (METHOD.md 10), the prior
    knowledge: one line per class with its description."""
    lines = [question]
    if knowledge:
        lines += [f"{n}: {d}." for n, d in zip(labels.names, labels.descriptions) if d]
    return "\n".join(lines + ["Options: " + ", ".join(labels.names) + "."])


def class_answer(name, template, reasoning=SFT_REASONING):
    """The ideal classification completion (SFT target), with `reasoning` in the r1 template."""
    think = f"<think>{reasoning}</think>" if template == "r1" else ""
    return f"{think}<answer>{name}</answer>"


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


class Classification:
    """VRFT-Aug's task: one of `labels` per image; with `knowledge` (PA_p) the classes'
    descriptions stand in the prompt. Reward weights as in METHOD.md section 10."""
    name = "classify"
    has_tau = False
    progress = ("acc_mean", "acc")

    def __init__(self, labels, knowledge, template, w_fmt=1.0, mfrs_weight=0.0, mfrs_decay=0.25,
                 recite_weight=0.0):
        check_template(template)
        self.labels, self.knowledge, self.template = labels, bool(knowledge), template
        self.weights = dict(w_fmt=w_fmt, mfrs_weight=mfrs_weight, mfrs_decay=mfrs_decay, recite_weight=recite_weight)

    def max_new_tokens(self, tiny):
        return 64 if tiny else 256  # a class with its reasoning is longer than a box

    def fields(self):
        return {"medloc_task": self.name, "medloc_labels": self.labels.to_json(), "medloc_knowledge": self.knowledge}

    def prompt(self, sample):
        query = class_query(sample.query, self.labels, self.knowledge)
        return query + (R1_CLASS_SUFFIX if self.template == "r1" else "")

    def known_text(self):
        """The injected prior knowledge (what R_recite compares the reasoning with), or ''."""
        return " ".join(self.labels.descriptions) if self.knowledge else ""

    def sft_reasoning(self, label, i):
        """The SFT target's reasoning for the i-th sample of a batch: with the knowledge in the
        prompt (PA_p) every other one recites the true class's description. A pretrained VLM
        quotes its prompt some of the time; the tiny one must be shown, so that R_recite of either
        sign has two behaviours of the warm-started policy to choose between."""
        description = self.labels.descriptions[label]
        return f"{description}." if self.knowledge and description and i % 2 else SFT_REASONING

    def sft_answer(self, sample, i, input_size):
        return class_answer(self.labels.names[sample.label], self.template, self.sft_reasoning(sample.label, i))

    def rewards(self, texts, samples, input_sizes, tau):
        return score_classes(texts, [s.label for s in samples], self.labels.names, self.template,
                             knowledge=self.known_text(), **self.weights)

    def step_stats(self, scores, tau):
        return {f"{k}_mean": scores[k].mean().item() for k in ("acc", "mfrs", "recite")}

    def predict(self, text, sample, input_size):
        return {"text": text, "class": parse_class(text, self.labels.names)}

    def record(self, sample, pred):
        """One line of eval.py --predictions: the sample, the answer, the class read from it and the truth."""
        names = self.labels.names
        return {"source": sample.source, "image": sample.path, "query": sample.query, "answer": pred["text"],
                "class": None if pred["class"] is None else names[pred["class"]], "truth": names[sample.label]}

    def postfix(self, preds):
        return {}

    def metrics(self, samples, preds):
        return class_metrics([s.label for s in samples], [p["class"] for p in preds], self.labels)

    @staticmethod
    def table(metrics):
        cols = [c for c in ("accuracy", "macro_f1", "qwk", "parse_fail") if c in metrics]
        extra = f"{metrics['mae']:>12.3f}" if "mae" in metrics else ""
        return (f"{'n':>6}" + "".join(f"{c:>12}" for c in cols) + (f"{'mae':>12}" if extra else "") + "\n"
                + f"{metrics['n']:>6}" + "".join(f"{100 * metrics[c]:>12.2f}" for c in cols) + extra)

    def save_plots(self, metrics, stem):
        save_confusion(metrics, stem + "_confusion.png")


# ----------------------------------------------------------------------------- a saved model's task
def of_config(config, template, coord, where="config.json"):
    """The task a model was trained for, from the fields its config.json carries (eval.py)."""
    task = getattr(config, "medloc_task", "ground")
    if task == "classify":
        return Classification(labels_from_json(config.medloc_labels, where), config.medloc_knowledge, template)
    return MultiGrounding(template, coord) if task == MultiGrounding.name else Grounding(template, coord)


def of_model(vlm, where="config.json"):
    return of_config(vlm.model.config, vlm.template, vlm.coord, where)


def saved_labels(name):
    """The labels of a classifier's folder, None for a grounding model: read from config.json
    alone, so eval.py checks its data against them before loading any weights."""
    if name == "tiny":
        return None
    config = model_config(name)  # a one-line error for a run folder or a missing model
    if getattr(config, "medloc_task", "ground") != "classify":
        return None
    return labels_from_json(config.medloc_labels, os.path.join(name, "config.json"))
