"""Data: grounding JSONL records (METHOD.md section 9) and the classification sets of VRFT-Aug
(section 10: labels files, JSONL records), read and validated; the built-in synthetic sets
(synth.py makes their images). The field's annotation formats, DICOM, masks and MedMNIST .npz
files become such JSONL through prepare.py.

A dataset is a list of `Sample`s: an image (loaded on demand), a text query, the GT box in
original-image pixels and where it came from (file:line). `load_dataset(spec)` takes a JSONL path
or `synth:KIND[:SPLIT]` with KIND in derm, xray, us, mix, multi (several boxes); `load_class_dataset` the same for
classification (`synth:grade|type`). Data sets are written by prepare.py, never here.
"""
import copy
import difflib
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image

from config import BOX_FORMATS
from files import regular_file
from reward import normalise, parse_box, parse_boxes
from synth import CLASS_SIZES, GROUNDING_KINDS, KINDS, SPLITS, SYNTH_SIZES, synth_class_sample, synth_multi_sample, synth_sample

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data; the message lists file:line: reason for each offending record."""


@dataclass
class Sample:
    load: Callable[[], Image.Image]  # RGB image, true size
    query: str
    box: tuple                       # (x1, y1, x2, y2) in original-image pixels; None for several
    image_size: tuple                # (W, H)
    source: str                      # "file:line" or "synth:kind:split:index"
    boxes: tuple = None              # a record of several boxes (field 'boxes'): all of them, in pixels
    path: str = ""                   # the image file (a JSONL record's)

    def truth(self):
        """Every GT box of the sample: its several, or its one."""
        return self.boxes if self.boxes is not None else (self.box,)

    def image(self):
        return self.load()


def to_rgb(img):
    """Any PIL image -> 8-bit RGB; 16-bit/float grey is min-max scaled (12-bit X-rays stay visible)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8))
    return img.convert("RGB")


def read_image(path):
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


# ----------------------------------------------------------------------------- JSONL
def _record_fields(obj):
    """(image, query, boxes as written, several) of one record in a METHOD.md section 9 shape;
    raises ValueError. `several`: the record gives its boxes as a list (field 'boxes')."""
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    if not isinstance(obj.get("image"), str) or not obj["image"]:
        raise ValueError("field 'image': missing or not a string")
    if "boxes" in obj and ("solution" in obj or "conversations" in obj):
        other = "solution" if "solution" in obj else "conversations"
        raise ValueError(f"fields 'boxes' and {other!r} both given: a record gives its answer once, one box as "
                         "'solution' or a list as 'boxes' (METHOD.md 9)")
    if "boxes" in obj:
        query = obj.get("problem")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("field 'problem': missing or empty query")
        return obj["image"], query.strip(), _boxes_field(obj["boxes"]), True
    if "conversations" in obj:
        turns = obj["conversations"]
        try:
            query = next(t["value"] for t in turns if t.get("from") == "human")
            answer = next(t["value"] for t in turns if t.get("from") == "gpt")
        except (StopIteration, TypeError, AttributeError, KeyError):
            raise ValueError("field 'conversations': needs a 'human' and a 'gpt' turn with 'value'")
        query = query.replace("<image>", "").strip()
    elif "problem" in obj and "solution" in obj:
        query, answer = obj["problem"], obj["solution"]
    else:
        missing = [k for k in ("problem", "solution") if k not in obj][0]
        raise ValueError(f"field {missing!r}: missing (or give 'conversations')" + misspelt(missing, obj))
    if not isinstance(query, str) or not query.strip():
        raise ValueError("field 'problem': missing or empty query")
    return obj["image"], query.strip(), [_box_field(answer)], False


def misspelt(field, obj):
    """'; the record has 'soluton': did you mean 'solution'?' where one of its keys is close to `field`."""
    close = difflib.get_close_matches(field, [k for k in obj if isinstance(k, str)], n=1, cutoff=0.7)
    return f"; the record has {close[0]!r}: did you mean {field!r}?" if close else ""


MAX_QUERY_CHARS = 2000      # a grounding query is a sentence; beyond this it is a data error
# A labels file's text goes into every classification prompt (the options, and with PA_p the
# descriptions): bounded like a query, so a runaway file is a data error, not an out-of-memory.
MAX_NAME_CHARS, MAX_DESCRIPTION_CHARS, MAX_CLASSES, MAX_LABELS_BYTES = 100, 500, 100, 1_000_000
MAX_ASPECT = 200            # the Qwen processor refuses images more elongated than this
MAX_IMAGE_PIXELS = 100_000_000  # decoding time per image is bounded by this


def _box_field(answer):
    """The 4 numbers of the answer field, as written (not yet converted to pixels). An answer of
    several boxes is refused, not cut to its first: such a record gives them as field 'boxes'."""
    if isinstance(answer, str):
        several = parse_boxes(answer)
        if several is not None and len(several) > 1:
            raise ValueError(f"field 'solution': holds {len(several)} boxes; give a record's several boxes as "
                             "field 'boxes': [[x1, y1, x2, y2], ...] (METHOD.md 9)")
        box = parse_box(answer)
        if box is None:
            raise ValueError(f"field 'solution': no box in {answer[:60]!r}")
    elif isinstance(answer, list):
        box = answer
    else:
        raise ValueError("field 'solution': expected [x1, y1, x2, y2] or a string holding one")
    return _four_numbers(box, "field 'solution': box")


def _four_numbers(box, what):
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"{what} is not 4 finite numbers: {box}")
    return tuple(float(v) for v in box)


MAX_BOXES = 100  # boxes of one record: beyond this the answer would not fit a completion


def _boxes_field(boxes):
    """The boxes of field 'boxes', as written: a list of one to MAX_BOXES boxes. No empty list:
    a record says where a finding is; images without it are not trained (METHOD.md 4.2)."""
    if not isinstance(boxes, list) or not boxes:
        raise ValueError("field 'boxes': expected a list of one or more [x1, y1, x2, y2] (a record without "
                         "the finding is not trained: METHOD.md 4.2)")
    if len(boxes) > MAX_BOXES:
        raise ValueError(f"field 'boxes': {len(boxes)} boxes, at most {MAX_BOXES}")
    return [_four_numbers(b, f"field 'boxes' (box {k + 1}): box") for k, b in enumerate(boxes)]


def _to_pixels(raw, box_format, W, H, field="field 'solution'"):
    """[x1, y1, x2, y2] in pixels of the W x H image from the box as the file holds it."""
    x1, y1, x2, y2 = BOX_FORMATS[box_format](raw, W, H)
    if x2 <= x1 or y2 <= y1:
        hint = " (if the file holds [x, y, w, h], pass --box-format xywh)" if box_format == "xyxy" else ""
        raise ValueError(f"{field}: need x2 > x1 and y2 > y1, got {list(raw)}{hint}")
    if x1 < 0 or y1 < 0 or x2 > W or y2 > H:
        raise ValueError(f"{field}: box {list(raw)} ({box_format}) is outside the {W}x{H} image")
    if x2 - x1 < 1 or y2 - y1 < 1:  # among pixel boxes, such a box is almost surely a normalised one
        hint = "; it looks normalised (pass --box-format norm1 if the file holds 0..1 boxes)" if box_format in ("xyxy", "xywh") else ""
        raise ValueError(f"{field}: box {list(raw)} ({box_format}) is {x2 - x1:.3g} x {y2 - y1:.3g} pixels, "
                         f"under one pixel wide or high{hint}")
    return (x1, y1, x2, y2)



def _image_size(path):
    """(W, H) of an image that decodes completely: a file with a good header and a broken body
    fails here, not hours into training. Decoding time is bounded by MAX_IMAGE_PIXELS."""
    regular_file(path, "field 'image'")
    try:
        with Image.open(path) as img:
            W, H = img.size
            if W * H > MAX_IMAGE_PIXELS:
                raise ValueError(f"field 'image': {path} is {W}x{H}, over {MAX_IMAGE_PIXELS:,} pixels")
            img.load()
    except FileNotFoundError:
        raise ValueError(f"field 'image': file not found: {path}")
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for broken or truncated files
        raise ValueError(f"field 'image': unreadable image {path}: {e}")
    if max(W, H) / min(W, H) > MAX_ASPECT:
        raise ValueError(f"field 'image': {path} is {W}x{H}; the Qwen processor takes aspect ratios "
                         f"up to {MAX_ASPECT}")
    return W, H


def _decode(raw):
    """One JSONL line (bytes) -> its JSON value; raises ValueError saying what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})")


def read_records(path, parse, skip_invalid):
    """[(parse(record), "file:line")] of a JSONL file. Every bad line is listed in one DataError,
    or with `skip_invalid` dropped and counted; an empty result is an error either way."""
    results, errors = [], []
    try:
        regular_file(path, "dataset")
        f = open(path, "rb")  # bytes: a bad byte is one record's error, not the whole file's
    except ValueError as e:
        raise DataError(str(e))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                results.append((parse(_decode(raw)), f"{path}:{lineno}"))
            except ValueError as e:
                errors.append((lineno, str(e)))
    if errors and not skip_invalid:
        raise DataError(f"{path}: {len(errors)} invalid record(s) (use --skip-invalid to drop them):\n  "
                        + "\n  ".join(by_problem(path, errors)))
    if errors:
        print(f"{path}: skipped {len(errors)} invalid record(s): " + "; ".join(by_problem(path, errors, 3)))
    if not results:
        raise DataError(f"{path}: no valid records: the dataset is empty")
    return results


def by_problem(path, errors, most=20):
    """One line per distinct problem of (line, problem) pairs: its first record's file:line, the
    problem, and how many records have it, at which lines (a typo'd field in every record is one
    line, not one per record)."""
    lines = {}
    for lineno, problem in errors:
        lines.setdefault(problem, []).append(lineno)
    shown = [f"{path}:{at[0]}: {problem}" + (f" ({len(at)} records: lines {', '.join(map(str, at[:5]))}"
                                             f"{', ...' if len(at) > 5 else ''})" if len(at) > 1 else "")
             for problem, at in list(lines.items())[:most]]
    return shown + ([f"... and {len(lines) - most} other problems"] if len(lines) > most else [])


def _parse_record(obj, image_root, box_format):
    """One grounding record -> (Sample, its boxes as written); raises ValueError with the reason."""
    image, query, boxes, several = _record_fields(obj)
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"field 'problem': query is {len(query):,} characters, at most {MAX_QUERY_CHARS:,}")
    path = image if os.path.isabs(image) else os.path.join(image_root, image)
    W, H = _image_size(path)
    load = lambda p=path: read_image(p)  # noqa: E731
    if not several:
        return Sample(load, query, _to_pixels(boxes[0], box_format, W, H), (W, H), "", path=path), boxes
    pixels = tuple(_to_pixels(b, box_format, W, H, f"field 'boxes' (box {k + 1})") for k, b in enumerate(boxes))
    return Sample(load, query, None, (W, H), "", boxes=pixels, path=path), boxes


def check_not_normalised(path, samples, raw_boxes, box_format):
    """Pixel boxes that all lie in [0, 1] on images of real size are almost surely normalised."""
    smallest = min(min(s.image_size) for s in samples)
    if box_format == "xyxy" and smallest >= 32 and all(max(b) <= 1.0 for b in raw_boxes):
        raise DataError(f"{path}: every box lies within [0, 1] on images at least {smallest} pixels a side: "
                        f"the boxes look normalised; pass --box-format norm1 (or norm1000 / xywh, whichever "
                        f"the file holds)")


def load_jsonl(path, image_root=None, skip_invalid=False, box_format="xyxy"):
    """Records of a JSONL file; one error listing every bad line unless `skip_invalid`."""
    if box_format not in BOX_FORMATS:
        raise DataError(f"unknown box format {box_format!r}: expected one of {sorted(BOX_FORMATS)}")
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    records = read_records(path, lambda obj: _parse_record(obj, image_root, box_format), skip_invalid)
    samples, raw_boxes = [], []
    for (sample, boxes), where in records:
        sample.source = where
        samples.append(sample)
        raw_boxes += boxes
    check_not_normalised(path, samples, raw_boxes, box_format)
    return samples


# ----------------------------------------------------------------------------- data order
@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def prompt_indices(step, batch, n, seed):
    """Dataset rows of `step`: a fresh seeded permutation per epoch, so a resumed run sees the same."""
    rows = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n)
        rows.append(int(epoch_order(seed, epoch, n)[k]))  # one permutation per epoch, not per row
    return rows


def resample_indices(step, round, batch, n, seed, rank=0, world=1):
    """Dataset rows of --dynamic-sampling's extra round `round` of `step` (METHOD.md 5.8): `batch`
    rows drawn from a stream of their own seeded by (seed, step, round), so a resumed run draws the
    same; this rank's share of them, as a step's rows are shared."""
    rows = np.random.default_rng([seed, step, round]).choice(n, size=min(batch, n), replace=False)
    per = len(rows) // world
    return [int(i) for i in rows[rank * per:(rank + 1) * per]]


# ----------------------------------------------------------------------------- synthetic data
class MadeOnAccess(Sequence):
    """`n` synthetic samples, each made by `make(i)` on first access and kept (a few hundred kB
    each), since drawing one costs more than a tiny model's training step on it."""

    def __init__(self, n):
        self.n, self.made = n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        if i not in self.made:
            self.made[i] = self.make(i)
        return self.made[i]


def first_records(samples, n, spec):
    """The first n records of a training set (--train-size); more than it holds is an error."""
    if n > len(samples):
        raise DataError(f"--train-size {n}: {spec} holds {len(samples):,} training records")
    if isinstance(samples, MadeOnAccess):  # still made on access, the first n alone
        part = copy.copy(samples)
        part.n = n
        return part
    return samples[:n]


class SynthSet(MadeOnAccess):
    """`n` synthetic grounding samples of `kind` (derm, xray, us or mix: the three interleaved;
    multi: one to three skin lesions an image, several boxes per query)."""

    def __init__(self, kind, split="train", n=None, seed=0):
        if kind not in GROUNDING_KINDS:
            hint = " (a classification set: train with --task classify)" if kind in SYNTH_LABELS else ""
            raise DataError(f"unknown synthetic kind {kind!r}: expected one of {GROUNDING_KINDS}{hint}")
        self.kind, self.split, self.seed = kind, split, seed
        super().__init__(SYNTH_SIZES[split] if n is None else n)

    def make(self, i):
        if self.kind == "multi":
            image, query, boxes = synth_multi_sample(self.split, i, self.seed)
            return Sample(lambda: image, query, None, image.size, f"synth:multi:{self.split}:{i}", boxes=tuple(boxes))
        k, j = (KINDS[i % 3], i // 3) if self.kind == "mix" else (self.kind, i)
        image, query, box = synth_sample(k, self.split, j, self.seed)
        return Sample(lambda: image, query, box, image.size, f"synth:{k}:{self.split}:{j}")


def synth_spec(spec, default_split="train"):
    """`synth:KIND[:SPLIT]` -> (KIND, SPLIT); SPLIT defaults to `default_split`."""
    parts = spec.split(":")
    split = parts[2] if len(parts) > 2 else default_split
    if split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}: expected train or test")
    return parts[1], split


def load_dataset(spec, default_split="train", image_root=None, skip_invalid=False, n=None, seed=0,
                 box_format="xyxy"):
    """A JSONL path, or `synth:KIND[:SPLIT]` (SPLIT defaults to `default_split`)."""
    if spec.startswith("synth:"):
        return SynthSet(*synth_spec(spec, default_split), n, seed)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file (and not a synth:KIND spec)")
    samples = load_jsonl(spec, image_root, skip_invalid, box_format)
    return samples[:n] if n else samples


def several_boxes(samples):
    """Whether a grounding set gives its records' boxes as lists (synth:multi, field 'boxes')."""
    if isinstance(samples, SynthSet):
        return samples.kind == "multi"
    return any(s.boxes is not None for s in samples)


# ----------------------------------------------------------------------------- classification (VRFT-Aug)
@dataclass
class Labels:
    """The classes of a classification set, in order (grade order when `ordinal`), with an
    optional short description of each: the prior knowledge PA_p puts in the prompt (METHOD.md 10)."""
    names: list
    descriptions: list
    ordinal: bool = False
    question: str = "What is the diagnosis?"

    def to_json(self):
        return {"classes": [{"name": n, "description": d} for n, d in zip(self.names, self.descriptions)],
                "ordinal": self.ordinal, "question": self.question}

    def same_classes(self, other):
        """The same class names (case aside) in the same order."""
        return [n.lower() for n in self.names] == [n.lower() for n in other.names]


def read_labels(path):
    """A labels file: {"classes": [name or {"name", "description"}, ...], "ordinal": bool, "question": str}."""
    try:
        regular_file(path, "labels file")
        with open(path, "rb") as f:
            raw = f.read(MAX_LABELS_BYTES + 1)
    except ValueError as e:
        raise DataError(str(e))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    if len(raw) > MAX_LABELS_BYTES:
        raise DataError(f"{path}: over {MAX_LABELS_BYTES:,} bytes; a labels file is class names and short descriptions")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start}")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})")
    return labels_from_json(obj, path)


def labels_from_json(obj, where):
    classes = obj.get("classes") if isinstance(obj, dict) else None
    if not isinstance(classes, list) or len(classes) < 2:
        raise DataError(f"{where}: field 'classes': a list of at least two class names")
    names, descriptions = [], []
    for k, c in enumerate(classes):
        if isinstance(c, dict):
            name, text = c.get("name"), c.get("description", "")
        else:
            name, text = c, ""
        if not isinstance(name, str) or not normalise(name) or not isinstance(text, str):
            raise DataError(f"{where}: field 'classes[{k}]': a name, or an object with 'name' and "
                            f"optionally 'description' (strings)")
        if len(name) > MAX_NAME_CHARS or len(text) > MAX_DESCRIPTION_CHARS:
            raise DataError(f"{where}: field 'classes[{k}]': a name is at most {MAX_NAME_CHARS} characters and a "
                            f"description at most {MAX_DESCRIPTION_CHARS:,} (they go into every prompt)")
        names.append(name.strip())
        descriptions.append(text.strip())
    answers = [normalise(n) for n in names]  # what a model's answer is compared with (reward.parse_class)
    same = sorted({names[i] for i, a in enumerate(answers) if answers.count(a) > 1})
    if same:
        raise DataError(f"{where}: field 'classes': {same} are one answer once case, spaces and a final "
                        "full stop are ignored; no answer could tell them apart")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{where}: field 'classes': {len(names)} classes, at most {MAX_CLASSES} (each is an option in the prompt)")
    ordinal, question = obj.get("ordinal", False), obj.get("question", Labels.question)
    if not isinstance(ordinal, bool) or not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'ordinal' must be true/false and 'question' a non-empty string")
    if len(question) > MAX_QUERY_CHARS:
        raise DataError(f"{where}: field 'question': {len(question):,} characters, at most {MAX_QUERY_CHARS:,}")
    return Labels(names, descriptions, ordinal, question.strip())


def with_knowledge(labels, path):
    """`labels` with the descriptions of the labels file `path` (PA_p's `--knowledge FILE`), which
    must list the same classes in the same order: a description is matched to its class by name."""
    known = read_labels(path)
    if not known.same_classes(labels):
        raise DataError(f"{path}: field 'classes': {known.names} are not the dataset's classes {labels.names} "
                        "(the same names in the same order)")
    return replace(labels, descriptions=known.descriptions)


@dataclass
class ClassSample:
    load: Callable[[], Image.Image]
    query: str
    label: int                       # index into Labels.names
    image_size: tuple
    source: str
    path: str = ""                   # the image file (a JSONL record's)

    def image(self):
        return self.load()


def load_class_jsonl(path, labels, image_root=None, skip_invalid=False):
    """Records {"image": path, "label": name or index, "problem": optional question}; one error
    listing every bad line unless `skip_invalid` (the same rules as the grounding loader)."""
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    by_name = {n.lower(): i for i, n in enumerate(labels.names)}

    def parse(obj):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            raise ValueError("field 'image': missing or not a string")
        y = obj.get("label")
        if isinstance(y, str) and y.strip().lower() in by_name:
            y = by_name[y.strip().lower()]
        elif not (isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(labels.names)):
            raise ValueError(f"field 'label': {y!r} is not one of {labels.names} or an index below "
                             f"{len(labels.names)}")
        query = obj.get("problem", labels.question)
        if not isinstance(query, str) or not query.strip() or len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"field 'problem': empty, not a string or over {MAX_QUERY_CHARS} characters")
        image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(image_root, obj["image"])
        size = _image_size(image)
        return ClassSample(lambda p=image: read_image(p), query.strip(), y, size, "", path=image)

    samples = []
    for sample, where in read_records(path, parse, skip_invalid):
        sample.source = where
        samples.append(sample)
    return samples


# Built-in sets: `grade` is ordinal (a lesion grade 0-4 visible in the number and size of dark
# spots), `type` is not (four lesion types told apart by colour and shape).
SYNTH_LABELS = {
    "grade": Labels(["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"],
                    ["no dark spot", "one small dark spot", "two dark spots", "three larger dark spots",
                     "four or more large dark spots"], True, "What is the lesion grade?"),
    "type": Labels(["nevus", "melanoma", "keratosis", "vascular"],
                   ["round even brown spot", "dark irregular black patch", "pale rough grey plaque",
                    "small bright red round spot"], False, "What is the lesion type?"),
}


class SynthClassSet(MadeOnAccess):
    """`n` samples of the built-in classification set `kind`."""

    def __init__(self, kind, split="train", n=None, seed=0):
        if kind not in SYNTH_LABELS:
            hint = " (a grounding set: drop --task classify)" if kind in GROUNDING_KINDS else ""
            raise DataError(f"unknown synthetic classification set {kind!r}: expected one of "
                            f"{list(SYNTH_LABELS)}{hint}")
        self.kind, self.split, self.seed, self.labels = kind, split, seed, SYNTH_LABELS[kind]
        super().__init__(CLASS_SIZES[split] if n is None else n)

    def make(self, i):
        image, label = synth_class_sample(self.kind, self.split, i, self.seed)
        return ClassSample(lambda: image, self.labels.question, label, image.size, f"synth:{self.kind}:{self.split}:{i}")


def load_class_dataset(spec, labels=None, default_split="train", image_root=None, skip_invalid=False, n=None):
    """(samples, Labels) of `synth:grade|type[:SPLIT]` or a JSONL file; `labels`: a labels file's
    path or a Labels (a synthetic set's own by default; a JSONL file needs them)."""
    labels_path = labels if isinstance(labels, str) else None
    given = labels if isinstance(labels, Labels) else None
    if spec.startswith("synth:"):
        data = SynthClassSet(*synth_spec(spec, default_split), n)
        labels = given or (read_labels(labels_path) if labels_path else data.labels)
        if not labels.same_classes(data.labels):
            raise DataError(f"{spec}: its classes {data.labels.names} are not the expected {labels.names} "
                            f"({labels_path or 'the model'}'s)")
        return data, labels
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file (and not a synth:grade|type spec)")
    if not (given or labels_path):
        raise DataError(f"{spec}: a classification JSONL needs --labels FILE (the class names in order)")
    labels = given or read_labels(labels_path)
    samples = load_class_jsonl(spec, labels, image_root, skip_invalid)
    return (samples[:n] if n else samples), labels
