"""Rewards for grounding: parse a box from text, bring it to the original image, score it.

METHOD.md sections 2 (coordinates), 3 (answer syntax) and 4 (rewards). Everything here is plain
Python on floats; `score_completions` turns a batch of completions into reward tensors.
"""
import json
import math
import re
from collections import Counter


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# `[a, b, c, d]`: a bare list, also the value of a JSON "bbox_2d" key (any fence around it).
_LIST_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
# Qwen2-VL `(x1,y1),(x2,y2)`, optionally between <|box_start|> and <|box_end|>.
_PAIR_BOX = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMATS = {  # METHOD.md section 3: the answer structure each template asks for
    "r1": re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL),
    "short": re.compile(rf"\s*<answer>\s*\[\s*{_NUM}(?:\s*,\s*{_NUM}){{3}}\s*\]\s*</answer>\s*"),
}


def parse_box(text):
    """First box in the first <answer> block (whole text if none), as written (METHOD.md 3)."""
    answer = _ANSWER.search(text)
    body = answer.group(1) if answer else text
    found = [m for m in (_LIST_BOX.search(body), _PAIR_BOX.search(body)) if m]
    if not found:
        return None
    first = min(found, key=lambda m: m.start())
    return tuple(float(v) for v in first.groups())


def to_image_frame(box, coord, image_size, input_size):
    """Model-frame box -> original-image pixels, clipped to the image (METHOD.md section 2)."""
    if box is None:
        return None
    W, H = image_size
    if coord == "abs":  # Qwen2.5-VL: pixels of the processor-resized image (width, height)
        sx, sy = W / input_size[0], H / input_size[1]
    elif coord == "norm1000":  # Qwen2-VL: 0..1000 on both axes
        sx, sy = W / 1000.0, H / 1000.0
    else:
        raise ValueError(f"unknown coordinate frame {coord!r}: expected 'abs' or 'norm1000'")
    x1, y1, x2, y2 = box
    clip = lambda v, hi: min(max(v, 0.0), float(hi))
    return (clip(x1 * sx, W), clip(y1 * sy, H), clip(x2 * sx, W), clip(y2 * sy, H))


def from_image_frame(box, coord, image_size, input_size):
    """Original-image box -> the model's frame: the inverse of `to_image_frame` (METHOD.md 2)."""
    W, H = image_size
    if coord == "abs":
        sx, sy = input_size[0] / W, input_size[1] / H
    elif coord == "norm1000":
        sx, sy = 1000.0 / W, 1000.0 / H
    else:
        raise ValueError(f"unknown coordinate frame {coord!r}: expected 'abs' or 'norm1000'")
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _area(box):
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _valid(box):
    return box is not None and box[2] > box[0] and box[3] > box[1]


def _inter_union(a, b):
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return inter, _area(a) + _area(b) - inter


def iou(a, b):
    """Intersection over union in continuous coordinates; None/empty/inverted boxes -> 0 (METHOD.md 4)."""
    if not (_valid(a) and _valid(b)):
        return 0.0
    inter, union = _inter_union(a, b)
    return inter / union


def area_ratio(box, gt):
    """The predicted box's area over the GT box's (how loose a box is); None for no valid box."""
    if not (_valid(box) and _valid(gt)):
        return None
    return (box[2] - box[0]) * (box[3] - box[1]) / ((gt[2] - gt[0]) * (gt[3] - gt[1]))


def giou01(a, b):
    """Generalised IoU mapped from [-1, 1] to [0, 1]; invalid boxes -> 0 (METHOD.md section 4 option)."""
    if not (_valid(a) and _valid(b)):
        return 0.0
    inter, union = _inter_union(a, b)
    hull = _area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    return (inter / union - (hull - union) / hull + 1.0) / 2.0


def format_reward(text, template):
    """1.0 when the completion has the template's answer structure, else 0.0 (METHOD.md 3-4)."""
    return 1.0 if _FORMATS[template].fullmatch(text) and parse_box(text) is not None else 0.0


def accuracy_reward(iou_value, giou_value, mode, tau):
    """r_acc: 1[IoU >= tau] ("threshold"), IoU ("iou", Raw-IoU) or GIoU in [0, 1] ("giou")."""
    if mode == "threshold":
        if tau is None:
            raise ValueError("reward mode 'threshold' needs a tau; use --reward iou with raw-iou")
        return 1.0 if iou_value >= tau else 0.0
    if mode == "iou":
        return iou_value
    if mode == "giou":
        return giou_value
    raise ValueError(f"unknown reward mode {mode!r}: expected 'threshold', 'iou' or 'giou'")


def score_completions(texts, gt_boxes, image_sizes, input_sizes, coord, tau, mode="threshold",
                      template="short", w_fmt=1.0):
    """Per-completion IoU, accuracy, format, total reward r = r_acc + w_fmt*r_fmt (METHOD.md 4)."""
    cols = {k: [] for k in ("iou", "acc", "fmt", "reward", "parse_fail", "area")}
    for text, gt, size, in_size in zip(texts, gt_boxes, image_sizes, input_sizes, strict=True):
        raw = parse_box(text)
        box = to_image_frame(raw, coord, size, in_size)
        overlap = iou(box, gt)
        acc = accuracy_reward(overlap, giou01(box, gt) if mode == "giou" else 0.0, mode, tau)
        fmt = format_reward(text, template)
        area = area_ratio(box, gt)
        for key, value in (("iou", overlap), ("acc", acc), ("fmt", fmt), ("reward", acc + w_fmt * fmt),
                           ("parse_fail", float(raw is None)), ("area", float("nan") if area is None else area)):
            cols[key].append(value)
    return as_tensors(cols)


# ----------------------------------------------------------------------------- several boxes (METHOD.md 4.2)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
_MULTI_FORMATS = {  # the answer structure; the box list itself is checked by parse_boxes
    "r1": re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL),
    "short": re.compile(r"\s*<answer>[^<]*</answer>\s*"),
}


MAX_ANSWER_BOXES = 100  # an answer of more is unparsed: no record holds more (data.MAX_BOXES), and it bounds the matching


def _box_of(item):
    """A box from one JSON item: [x1, y1, x2, y2] or {"bbox_2d": [...]} of finite numbers; else None
    (a JSON integer too large for a float too)."""
    if isinstance(item, dict):
        item = item.get("bbox_2d")
    ok = isinstance(item, list) and len(item) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300 for v in item)
    return tuple(float(v) for v in item) if ok else None


def parse_boxes(text):
    """The boxes of the first <answer> block (the whole text if none), in the order written, or None
    when it is not one box or a JSON list of boxes (METHOD.md 3): `[{"bbox_2d": [...]}, ...]`,
    `[[x1, y1, x2, y2], ...]`, one such box alone, or `[]` for none. Strict: one malformed item
    makes the whole answer unparsed (scored 0), as does anything around the list but a code fence."""
    answer = _ANSWER.search(text)
    body = answer.group(1) if answer else text
    fenced = _FENCE.match(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except (ValueError, RecursionError):  # not JSON, or brackets nested deeper than Python recurses
        return None
    one = _box_of(value)
    if one is not None:
        return [one]
    if not isinstance(value, list) or len(value) > MAX_ANSWER_BOXES:
        return None
    boxes = [_box_of(item) for item in value]
    return None if any(b is None for b in boxes) else boxes


def best_assignment(weights):
    """The one-to-one assignment of rows to columns of `weights` (a list of rows) with the largest
    total weight: the Hungarian method with row and column potentials, O(n^3) for n = max(rows,
    columns), the matrix padded to a square with zeros. Returns {row: column}."""
    rows, cols = len(weights), len(weights[0]) if weights else 0
    n = max(rows, cols)
    cost = [[-(weights[i][j] if i < rows and j < cols else 0.0) for j in range(n)] for i in range(n)]
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)      # potentials: u[i] + v[j] <= cost, equal on assigned pairs
    owner = [0] * (n + 1)                       # owner[j]: the row (1-based) assigned to column j; 0 none
    for i in range(1, n + 1):                    # add row i, then grow an alternating path to a free column
        owner[0], j0 = i, 0
        slack, back, used = [math.inf] * (n + 1), [0] * (n + 1), [False] * (n + 1)
        while owner[j0]:
            used[j0] = True
            i0, delta, j1 = owner[j0], math.inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < slack[j]:
                        slack[j], back[j] = reduced, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(n + 1):               # shift the potentials so one more edge becomes tight
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
        while j0:                                # flip the path: every row on it takes the next column
            j1 = back[j0]
            owner[j0] = owner[j1]
            j0 = j1
    return {owner[j] - 1: j - 1 for j in range(1, n + 1) if owner[j] - 1 < rows and j - 1 < cols}


def overlaps(pred, true):
    """The IoU of every predicted box (a row) with every true box (a column)."""
    return [[iou(p, t) for t in true] for p in pred]


def match_boxes(pred, true):
    """IoUs of the predicted-true pairs of the assignment with the largest total IoU (METHOD.md 4.2),
    pairs that do not overlap left out: a duplicate prediction finds no second partner."""
    if not pred or not true:
        return []
    overlap = overlaps(pred, true)
    return [overlap[i][j] for i, j in sorted(best_assignment(overlap).items()) if overlap[i][j] > 0]


def most_hits(overlap, tau):
    """The true positives at tau: pairs with IoU >= tau in the one-to-one matching that has the most
    of them, ties broken by its total IoU. The matching of largest total IoU can hold fewer (one
    pair at 0.571 loses to two at 0.467 + 0.207), so it is its own assignment: a hit weighs more
    than any total of IoUs (at most min(P, T) < n + 1), one Hungarian pass, O(n^3)."""
    if not overlap or not overlap[0]:
        return 0
    heavy = min(len(overlap), len(overlap[0])) + 1
    weights = [[heavy * (v >= tau) + v for v in row] for row in overlap]
    return sum(overlap[i][j] >= tau for i, j in best_assignment(weights).items())


def f1_at(overlap, n_pred, n_true, tau):
    """F1 at tau: 2 TP / (P + T), TP the most pairs at IoU >= tau of any one-to-one matching
    (most_hits; `overlap` the IoU matrix of overlaps). MedLoc-R1's threshold reward for several
    boxes; 1[IoU >= tau] for one box each."""
    return 2 * most_hits(overlap, tau) / (n_pred + n_true) if n_pred + n_true else 0.0


def soft_f1(matched, n_pred, n_true):
    """The matched IoU mass over the mean count, 2 sum(IoU) / (P + T): Raw-IoU's analogue (the IoU
    itself for one box each)."""
    return 2 * sum(matched) / (n_pred + n_true) if n_pred + n_true else 0.0


def score_multi(texts, gt_boxes, image_sizes, input_sizes, coord, tau, mode="threshold", template="short",
                w_fmt=1.0):
    """Per-completion rewards for several boxes (METHOD.md 4.2): r_acc = F1 at tau ("threshold") or
    the soft F1 ("iou"), r = r_acc + w_fmt * r_fmt. Columns: iou (the soft F1, what the curriculum's
    margin reads), hit (F1 at tau: its hit rate; at 0.5 under Raw-IoU, which has no tau, as the one-box
    task reports it), acc, fmt, reward, parse_fail, boxes (how many)."""
    if mode not in ("threshold", "iou"):
        raise ValueError(f"reward mode {mode!r} has no several-box form: expected 'threshold' or 'iou'")
    if mode == "threshold" and tau is None:
        raise ValueError("reward mode 'threshold' needs a tau; use --reward iou with raw-iou")
    cols = {k: [] for k in ("iou", "hit", "acc", "fmt", "reward", "parse_fail", "boxes")}
    for text, truth, size, in_size in zip(texts, gt_boxes, image_sizes, input_sizes, strict=True):
        raw = parse_boxes(text)
        boxes = [to_image_frame(b, coord, size, in_size) for b in raw or []]
        matched = match_boxes(boxes, truth)
        soft = soft_f1(matched, len(boxes), len(truth)) if raw is not None else 0.0
        hit = (f1_at(overlaps(boxes, truth), len(boxes), len(truth), 0.5 if tau is None else tau)
               if raw is not None else 0.0)
        fmt = 1.0 if raw is not None and _MULTI_FORMATS[template].fullmatch(text) else 0.0
        acc = hit if mode == "threshold" else soft
        for key, value in (("iou", soft), ("hit", hit), ("acc", acc), ("fmt", fmt), ("reward", acc + w_fmt * fmt),
                           ("parse_fail", float(raw is None)), ("boxes", float(len(boxes)))):
            cols[key].append(value)
    return as_tensors(cols)


# ----------------------------------------------------------------------------- classification (VRFT-Aug)
# METHOD.md section 10. A class answer is the text of the <answer> block; it scores only when it is
# exactly one class name after normalisation, so "A or B" (the hack of substring matchers) scores 0.
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_CLASS_FORMATS = {
    "r1": re.compile(r"\s*<think>.*?</think>\s*<answer>[^<]+</answer>\s*", re.DOTALL),
    "short": re.compile(r"\s*<answer>[^<]+</answer>\s*"),
}


def normalise(label):
    """Lower case, single spaces, no surrounding spaces or final full stop."""
    return " ".join(label.lower().split()).rstrip(".").strip()


def parse_class(text, names):
    """Index of the class named in the first <answer> block (the whole text if none), or None."""
    answer = _ANSWER.search(text)
    said = normalise(answer.group(1) if answer else text)
    matches = [i for i, name in enumerate(names) if normalise(name) == said]
    return matches[0] if len(matches) == 1 else None


def mfrs(predicted, true, decay):
    """Multi-grade fuzzy reward: decay ** |predicted - true| grades (1 when exact, 0 if unparsed)."""
    return 0.0 if predicted is None else decay ** abs(predicted - true)


def _ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def recitation(reasoning, knowledge, orders=(1, 2)):
    """Mean over n in `orders` of the clipped n-gram precision of `reasoning` against `knowledge`
    (BLEU's modified precision, without its brevity penalty): the share of the reasoning's n-grams
    found in the injected text, each counted at most as often as it occurs there."""
    said, known = normalise(reasoning).split(), normalise(knowledge).split()
    scores = []
    for n in orders:
        grams, pool = Counter(_ngrams(said, n)), Counter(_ngrams(known, n))
        hits = sum(min(count, pool[g]) for g, count in grams.items())
        scores.append(hits / sum(grams.values()) if grams else 0.0)
    return sum(scores) / len(scores)


def reasoning_of(text):
    """The <think> block, or the text outside the <answer> block when there is none."""
    think = _THINK.search(text)
    return think.group(1) if think else _ANSWER.sub(" ", text)


def score_classes(texts, true, names, template="short", w_fmt=1.0, mfrs_weight=0.0, mfrs_decay=0.25,
                  recite_weight=0.0, knowledge=""):
    """Per-completion reward of VRFT-Aug (METHOD.md 10):
    r = r_acc + w_fmt * r_fmt + mfrs_weight * R_MFRS + recite_weight * R_recite."""
    cols = {k: [] for k in ("acc", "fmt", "mfrs", "recite", "reward", "parse_fail")}
    for text, y in zip(texts, true, strict=True):
        pred = parse_class(text, names)
        acc = float(pred == y)
        fmt = 1.0 if _CLASS_FORMATS[template].fullmatch(text) and pred is not None else 0.0
        fuzzy = mfrs(pred, y, mfrs_decay) if mfrs_weight else 0.0
        recite = recitation(reasoning_of(text), knowledge) if recite_weight and knowledge else 0.0
        reward = acc + w_fmt * fmt + mfrs_weight * fuzzy + recite_weight * recite
        for key, value in (("acc", acc), ("fmt", fmt), ("mfrs", fuzzy), ("recite", recite),
                           ("reward", reward), ("parse_fail", float(pred is None))):
            cols[key].append(value)
    return as_tensors(cols)


def as_tensors(cols):
    """Reward columns (name -> one value per completion) as float32 tensors. torch is imported here
    alone: data.py and prepare.py read answers with this file's parsers and start without it."""
    import torch
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in cols.items()}
