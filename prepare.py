"""Every data set written to disk (METHOD.md section 9): the field's annotation files and DICOM images ->
the grounding JSONL that data.py loads, split by patient, every row accounted for in a report; the
built-in synthetic sets as files (`synth`); MedMNIST-style .npz -> classification JSONL (`npz`).

    python prepare.py nih BBox_List_2017.csv --images NIH/images --out data/nih
    python prepare.py vindr annotations_train.csv --images vindr/train --out data/vindr --max-side 1024
    python prepare.py rsna stage_2_train_labels.csv --images rsna/stage_2_train_images --out data/rsna
    python prepare.py mscxr MS_CXR_Local_Alignment_v1.1.0.csv --images mimic-cxr-jpg --out data/mscxr
    python prepare.py coco instances.json --images coco/images --out data/coco
    python prepare.py deeplesion DL_info.csv --images Images_png --out data/deeplesion --split official
    python prepare.py kvasir kavsir_bboxes.json --images Kvasir-SEG/images --out data/kvasir
    python prepare.py masks HAM10000/masks --images HAM10000/images --out data/ham --query "Locate the skin lesion."
    python prepare.py npz retinamnist.npz --names "grade 0,grade 1,grade 2,grade 3,grade 4" --ordinal --out data/retina
    python prepare.py synth --kind xray --n 200 --out data/synth-xray       # a built-in set as PNGs + data.jsonl
    python prepare.py inspect data/nih/train.jsonl data/nih/val.jsonl data/nih/test.jsonl --out data/nih/inspect

Each format is a reader: a generator of `Row`s from its file, one per box as the file holds it (or a
negative, or a row that cannot be a record and says why), with that file's quirks handled there.
Everything after the readers is written once: each image opened (its size from the file itself,
DICOM and 16-bit images windowed to 8-bit PNGs), boxes checked against it, readers' boxes of one
finding fused, the multi-box rule, the split by patient, the JSONL and `report.json`.
docs/data.md says what each format's multi-box rows, negatives and splits become.
"""
import argparse
import csv
import errno
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin
from tqdm import tqdm

from data import DataError, GROUNDING_KINDS, IMAGE_EXTS, MAX_BOXES, MAX_IMAGE_PIXELS, SynthSet, load_jsonl, read_image, read_labels
from files import Lock, RunError, first_line, make_folder, regular_file, reason_of, write_json, write_whole
from synth import SPLITS, tight_box

SPLIT_NAMES = ("train", "val", "test")
DICOM_EXTS = (".dcm", ".dicom")
PERCENTILES = (0.5, 99.5)   # the window of an image that states none: robust to a few hot pixels

# Why a row is left out. The first group is bad input (--strict stops at it); the second is the
# converter's policy, counted so that rows_read = rows in records + rows left out.
NOT_NUMERIC, ZERO_SIZE, OUTSIDE = "box not numeric", "zero-size or inverted box", "box outside the image"
MISSING, UNREADABLE, SIZE_MISMATCH = "image missing", "image unreadable", "image size differs from the one its boxes were drawn on"
MULTI_FRAME, AMBIGUOUS = "multi-frame DICOM (choose a frame with --frame)", "image name found in several folders"
OUTSIDE_IMAGES = "image outside --images (a path or a link that leads out of it)"
TOO_LARGE = f"image over {MAX_IMAGE_PIXELS:,} pixels (as its header declares: never decoded)"
NO_MASK, UNKNOWN_ID = "no mask for this image", "annotation names no known image or category"
NEGATIVE, SEVERAL, CROWD = ("negative (no box)", "several boxes for one query (--multi-box skip; keep trains them)",
                            "crowd annotation (iscrowd)")
TOO_MANY = f"more than {MAX_BOXES} boxes for one query (a record train.py refuses)"
POLICY = (NEGATIVE, SEVERAL, CROWD, TOO_MANY)


class PrepareError(DataError):
    """Input that stops the conversion: one line naming the file (and line) or the flag."""


@dataclass(slots=True)
class Row:
    where: str              # "file:line" (or "file:key" in a JSON file)
    image: str = ""         # how the file names the image: a path under --images, or a stem
    patient: str = ""       # the unit of the split
    finding: str = ""       # the class name, or MS-CXR's sentence: what fills the query
    box: tuple = None       # (x1, y1, x2, y2) in pixels of the original image
    reason: str = ""        # set: the row is left out, for this reason
    reader: str = ""        # who drew the box (VinDr's rad_id): overlapping boxes of other readers fuse
    split: str = ""         # the file's own split, where it has one
    size: tuple = None      # (W, H) as the file states it: checked against the image
    window: tuple = None    # (lo, hi) display range the file suggests (DeepLesion), after `offset`
    offset: float = 0.0     # added to stored pixel values (DeepLesion's 16-bit PNGs: -32768 -> HU)


def left(where, reason):
    return Row(where, reason=reason)


# ----------------------------------------------------------------------------- reading the files
def open_text(path):
    """A text file, gzip-compressed or not (torchxrayvision ships these CSVs as .csv.gz)."""
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: no such file")
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def csv_rows(path, fmt, columns, opts):
    """(where, {column: value}) for each data row, once the header holds `columns` (and
    --group-by's column); a header that is not the format's is one line naming what it expects."""
    f = open_text(path)
    with f:
        table = csv.reader(f)
        try:
            header = [h.strip() for h in next(table, [])]
        except (csv.Error, UnicodeDecodeError) as e:
            raise PrepareError(f"{path}: not a CSV file ({e})")
        wanted = list(columns) + ([opts.group_by] if opts.group_by else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            shown = ", ".join(h for h in header if h) or "nothing"
            raise PrepareError(f"{path}: not a {fmt} file: expected the columns {', '.join(wanted)} "
                               f"(missing {', '.join(missing)}; the header holds {shown})")
        try:
            for values in table:
                if any(v.strip() for v in values):
                    yield f"{path}:{table.line_num}", dict(zip(header, (v.strip() for v in values)))
        except (csv.Error, UnicodeDecodeError) as e:
            raise PrepareError(f"{path}:{table.line_num}: unreadable CSV row ({e})")


def numbers(values):
    """The floats of `values`, or None if one is not a finite number."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def box_row(row, values, xywh=False):
    """`row` with its box from 4 strings (x1, y1, x2, y2, or x, y, w, h), or left out saying why."""
    b = numbers(values)
    if b is None or len(b) != 4:
        return left(row.where, NOT_NUMERIC)
    x1, y1, a, c = b
    row.box = (x1, y1, x1 + a, y1 + c) if xywh else b
    if not (row.box[2] > row.box[0] and row.box[3] > row.box[1]):
        return left(row.where, ZERO_SIZE)
    return row


def grouped(opts, fields, default):
    """The patient of a row: --group-by's column where given, else the format's own."""
    return fields[opts.group_by] if opts.group_by else default


def finding_text(name):
    """A class name as it reads in a sentence: 'Pleural thickening' -> 'pleural thickening', 'ILD' stays."""
    return " ".join(w if len(w) > 1 and w.isupper() else w.lower() for w in name.split())


NIH_RSNA_SIZE = (1024, 1024)  # every released NIH PNG and RSNA DICOM: the frame their boxes are in


def read_nih(path, opts):
    """NIH ChestX-ray8 BBox_List_2017.csv: Image Index, Finding Label, then x, y, w, h under a header
    that spreads 'Bbox [x,y,w,h]' over four columns (and trailing empty ones). The boxes are in the
    released 1024 x 1024 frame: a resized copy of the images is refused, not mis-scaled."""
    for where, f in csv_rows(path, "NIH BBox_List_2017.csv", ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"), opts):
        image = f["Image Index"]
        row = Row(where, image, grouped(opts, f, image.split("_")[0]), finding_text(f["Finding Label"]), size=NIH_RSNA_SIZE)
        yield box_row(row, (f["Bbox [x"], f["y"], f["w"], f["h]"]), xywh=True)


def read_vindr(path, opts):
    """VinDr-CXR annotations_{train,test}.csv: image_id, class_name, [rad_id,] x_min..y_max in pixels
    of the DICOM; 'No finding' rows have empty boxes. The file's name is its official split."""
    split = official_split_of(path)
    for where, f in csv_rows(path, "VinDr-CXR annotations", ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"), opts):
        if not any(f[k] for k in ("x_min", "y_min", "x_max", "y_max")):
            yield left(where, NEGATIVE)
            continue
        row = Row(where, f["image_id"], grouped(opts, f, f["image_id"]), finding_text(f["class_name"]),
                  reader=f.get("rad_id", ""), split=split)
        yield box_row(row, (f["x_min"], f["y_min"], f["x_max"], f["y_max"]))


def read_rsna(path, opts):
    """RSNA Pneumonia stage_2_train_labels.csv: patientId, x, y, width, height, Target; one row per
    box (1-4 per patient), Target 0 rows are negatives. One 1024 x 1024 image per patient."""
    for where, f in csv_rows(path, "RSNA Pneumonia labels", ("patientId", "x", "y", "width", "height", "Target"), opts):
        if f["Target"] == "0":
            yield left(where, NEGATIVE)
            continue
        pid = f["patientId"]
        row = Row(where, pid, grouped(opts, f, pid), "lung opacity", size=NIH_RSNA_SIZE)
        yield box_row(row, (f["x"], f["y"], f["width"], f["height"]), xywh=True)


def read_mscxr(path, opts):
    """MS-CXR MS_CXR_Local_Alignment_*.csv: a sentence (label_text) per box, x, y, w, h, the image's
    path under MIMIC-CXR-JPG (files/pXX/pSUBJECT/sSTUDY/...), its stated size and (v1.1.0) a split."""
    cols = ("dicom_id", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
    for where, f in csv_rows(path, "MS-CXR local alignment", cols, opts):
        subject = next((p for p in f["path"].split("/") if re.fullmatch(r"p\d{6,}", p)), f["dicom_id"])
        if opts.split == "official" and "split" not in f:
            raise PrepareError(f"{path}: --split official needs the file's split column (MS-CXR v1.1.0 has one)")
        row = Row(where, f["path"], grouped(opts, f, subject), f["label_text"], split=f.get("split", ""),
                  size=numbers((f["image_width"], f["image_height"])))
        yield box_row(row, (f["x"], f["y"], f["w"], f["h"]), xywh=True)


DEEPLESION_TYPES = {1: "bone lesion", 2: "abdominal lesion", 3: "mediastinal lesion", 4: "liver lesion",
                    5: "lung lesion", 6: "kidney lesion", 7: "soft tissue lesion", 8: "pelvic lesion"}
DEEPLESION_SPLITS = {"1": "train", "2": "val", "3": "test"}


def read_deeplesion(path, opts):
    """DeepLesion DL_info.csv: the key slice File_name (PPPPPP_SS_SS_NNN.png, stored under
    Images_png/PPPPPP_SS_SS/NNN.png as 16-bit with an offset of 32768), Bounding_boxes as
    'x1, y1, x2, y2', the window it suggests (DICOM_windows, in HU), Train_Val_Test 1/2/3.
    Coarse_lesion_type -1 (unlabelled, most of the test split) becomes 'lesion'."""
    cols = ("File_name", "Patient_index", "Bounding_boxes", "Coarse_lesion_type", "Image_size", "DICOM_windows", "Train_Val_Test")
    for where, f in csv_rows(path, "DeepLesion DL_info.csv", cols, opts):
        stem, _, key_slice = f["File_name"].rpartition("_")
        kind = numbers([f["Coarse_lesion_type"]])
        finding = DEEPLESION_TYPES.get(int(kind[0]) if kind else -1, "lesion")
        row = Row(where, f"{stem}/{key_slice}", grouped(opts, f, f["Patient_index"]), finding,
                  split=DEEPLESION_SPLITS.get(f["Train_Val_Test"], ""), size=numbers(f["Image_size"].split(",")),
                  window=numbers(f["DICOM_windows"].split(",")), offset=-32768.0)
        yield box_row(row, f["Bounding_boxes"].split(","))


def read_json(path):
    f = open_text(path)
    try:
        with f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not a JSON file ({e})")


def read_coco(path, opts):
    """COCO instances JSON: images (id, file_name, width, height), annotations (image_id,
    category_id, bbox [x, y, w, h], iscrowd), categories. An image without annotations is a
    negative; --group-by names an image field (a patient id) to split by."""
    obj = read_json(path)
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in ("images", "annotations", "categories")):
        raise PrepareError(f"{path}: not a COCO instances file: expected the lists images, annotations, categories")
    try:
        images = {im["id"]: im for im in obj["images"]}
        names = {c["id"]: c["name"] for c in obj["categories"]}
    except (TypeError, KeyError) as e:
        raise PrepareError(f"{path}: not a COCO instances file: every image needs an id, every category an id and a name ({e})")
    if opts.group_by and not all(opts.group_by in im for im in images.values()):
        raise PrepareError(f"{path}: --group-by {opts.group_by}: not a field of every image")
    split, annotated = official_split_of(path), set()
    for i, a in enumerate(obj["annotations"]):
        where = f"{path}:annotations[{i}]"
        im = images.get(a.get("image_id")) if isinstance(a, dict) else None
        if im is None or a.get("category_id") not in names:
            yield left(where, UNKNOWN_ID)
            continue
        annotated.add(a["image_id"])
        if a.get("iscrowd"):
            yield left(where, CROWD)
            continue
        bbox = a.get("bbox") if isinstance(a.get("bbox"), list) else []
        row = Row(where, str(im.get("file_name", "")), str(im[opts.group_by] if opts.group_by else im["id"]),
                  finding_text(str(names[a["category_id"]])), split=split, size=numbers((im.get("width"), im.get("height"))))
        yield box_row(row, bbox, xywh=True)
    for i, im in enumerate(obj["images"]):
        if im["id"] not in annotated:
            yield left(f"{path}:images[{i}]", NEGATIVE)


def read_kvasir(path, opts):
    """Kvasir-SEG kavsir_bboxes.json: {image id: {height, width, bbox: [{label, xmin, ymin, xmax, ymax}]}}."""
    obj = read_json(path)
    if not isinstance(obj, dict) or not all(isinstance(v, dict) and "bbox" in v for v in obj.values()):
        raise PrepareError(f"{path}: not a Kvasir-SEG bbox file: expected {{image id: {{height, width, bbox: [...]}}}}")
    for key, v in obj.items():
        if not v["bbox"]:
            yield left(f"{path}:{key}", NEGATIVE)
        for j, b in enumerate(v["bbox"] if isinstance(v["bbox"], list) else [None]):
            b = b if isinstance(b, dict) else {}
            row = Row(f"{path}:{key}:bbox[{j}]", key, key, finding_text(str(b.get("label", "polyp"))),
                      size=numbers((v.get("width"), v.get("height"))))
            yield box_row(row, [b.get(k) for k in ("xmin", "ymin", "xmax", "ymax")])


def read_masks(masks, opts):
    """A segmentation set: ANNOTATIONS is the masks folder, one mask per image of --images (same
    stem, or stem_*); the box is the tight box around all of the mask (its regions together)."""
    if not os.path.isdir(masks):
        raise PrepareError(f"{masks}: no such folder (masks expects the masks folder)")
    by_stem = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(masks))}
    for name in sorted(os.listdir(opts.images)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        where = os.path.join(opts.images, name)
        match = by_stem.get(stem) or next((by_stem[k] for k in by_stem if k.startswith(stem + "_")), None)
        if match is None:
            yield left(where, NO_MASK)
            continue
        try:
            with Image.open(os.path.join(masks, match)) as m:
                a = np.asarray(m)
        except Exception:
            yield left(os.path.join(masks, match), UNREADABLE)
            continue
        a = a.max(-1) if a.ndim == 3 else a
        if not (a > 0).any():
            yield left(where, NEGATIVE)
            continue
        yield Row(where, name, stem, "lesion", tight_box(a > 0), size=(a.shape[1], a.shape[0]))


READERS = {"nih": read_nih, "vindr": read_vindr, "rsna": read_rsna, "mscxr": read_mscxr, "coco": read_coco,
           "deeplesion": read_deeplesion, "kvasir": read_kvasir, "masks": read_masks}
QUERIES = {"nih": "Locate the {finding} in this chest X-ray.", "vindr": "Locate the {finding} in this chest X-ray.",
           "rsna": "Locate the {finding} in this chest X-ray.", "mscxr": "{finding}",
           "coco": "Locate the {finding} in this image.", "deeplesion": "Locate the {finding} in this CT slice.",
           "kvasir": "Locate the {finding} in this colonoscopy image.", "masks": "Locate the {finding} in this image."}
OFFICIAL = ("vindr", "mscxr", "coco", "deeplesion")   # formats whose files carry a split of their own
NO_FIELDS = ("kvasir", "masks")              # nothing in the file to --group-by


def official_split_of(path):
    """The split a file's name gives (annotations_test.csv, instances_val2017.json), else train."""
    name = os.path.basename(path).lower()
    return next((s for s in ("test", "val") if s in name), "train")


# ----------------------------------------------------------------------------- images
def is_dicom(path):
    if path.lower().endswith(DICOM_EXTS):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


# What a missing decoder is installed with (pydicom's plugins), by transfer syntax UID prefix.
DECODERS = {"1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.7": "pylibjpeg pylibjpeg-libjpeg",
            "1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.9": "pylibjpeg pylibjpeg-openjpeg",
            "1.2.840.10008.1.2.4.20": "pylibjpeg pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle"}


class LeftOut(Exception):
    """An image that cannot make records: every row on it is left out for this reason."""


def window_linear(x, center, width, function="LINEAR"):
    """Modality values -> 0..255 by the DICOM VOI window (PS3.3 C.11.2.1.2): LINEAR (the default),
    LINEAR_EXACT or SIGMOID, output range 0..255."""
    x = np.asarray(x, np.float64)
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    elif width <= 1:  # LINEAR's width-1 window is a step at center - 0.5
        y = np.where(x <= center - 0.5, 0.0, 255.0)
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def window_range(x, lo, hi):
    """Values -> 0..255 with lo black and hi white (DeepLesion's windows, percentile windows)."""
    x = np.asarray(x, np.float64)
    y = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def percentile_window(x):
    lo, hi = np.percentile(x, PERCENTILES)
    return window_range(x, lo, hi)


def first_value(v):
    """A DICOM value that may be multi-valued (several windows): its first, as a float."""
    return float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)


def dicom_voi(ds, values, window):
    """Modality values of a grey DICOM -> 8-bit by --window: 'auto' takes the file's VOI LUT, else
    its first window (Window Center/Width with its VOI LUT Function), else the percentile window."""
    from pydicom.pixels import apply_voi_lut
    if window == "percentile":
        return percentile_window(values)
    if window != "auto":
        return window_linear(values, *window)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return window_range(apply_voi_lut(values, ds, prefer_lut=True), 0, 2 ** bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds and first_value(ds.WindowWidth) > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        return window_linear(values, first_value(ds.WindowCenter), first_value(ds.WindowWidth), function)
    return percentile_window(values)


def dicom_pixels(path, opts):
    """A DICOM file -> 8-bit grey (H, W) or RGB (H, W, 3): Rescale Slope/Intercept (the modality LUT),
    the VOI window, MONOCHROME1 inverted; one frame of a multi-frame file only when --frame says which."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut
    try:  # pydicom parses an element when it is read: a malformed one (a frame count of '1A') fails here
        ds = pydicom.dcmread(path, force=True)  # some writers leave out the preamble
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    except Exception as e:
        raise LeftOut(UNREADABLE) from e
    if "PixelData" not in ds:
        raise LeftOut(UNREADABLE)
    if frames > 1 and (opts.frame is None or opts.frame >= frames):
        raise LeftOut(MULTI_FRAME)
    try:  # what decoding would allocate, from the header, before any of it: a 6 MB file may declare 20000 x 20000
        declared = int(ds.Rows) * int(ds.Columns) * frames
    except (AttributeError, TypeError, ValueError) as e:
        raise LeftOut(UNREADABLE) from e
    if declared > MAX_IMAGE_PIXELS:
        raise LeftOut(TOO_LARGE)
    try:
        a = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
        if syntax is not None and syntax.is_compressed:
            package = next((p for k, p in DECODERS.items() if str(syntax).startswith(k)), "python-gdcm")
            raise PrepareError(f"{path}: its pixel data ({syntax.name}) cannot be decoded here ({first_line(e)}); "
                               f"pip install {package}")
        raise LeftOut(UNREADABLE) from e
    a = a[opts.frame] if frames > 1 else a
    try:  # the LUTs' and windows' elements, parsed as they are read
        if photometric == "PALETTE COLOR":
            a = apply_color_lut(a, ds)
        if a.ndim == 3:  # colour: pydicom hands RGB (YBR converted); scale wider samples to 8 bits
            top = float(a.max()) if a.dtype != np.uint8 else 255.0
            return a if a.dtype == np.uint8 else window_range(a, 0, max(top, 1.0))
        grey = dicom_voi(ds, apply_modality_lut(a, ds), opts.window)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise LeftOut(UNREADABLE) from e
    return 255 - grey if photometric == "MONOCHROME1" else grey


def raster_pixels(path, row, opts):
    """A PNG/JPEG/TIFF -> None when the loader can read it as it is (8-bit grey or colour), else
    8-bit grey from its 16-bit or float values (plus the file's offset; its window, else --window)."""
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                raise LeftOut(TOO_LARGE)
            img.load()
            if img.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
                return None, img.size
            values = np.asarray(img, np.float64) + row.offset
    except LeftOut:
        raise
    except Exception as e:
        raise LeftOut(UNREADABLE) from e
    if opts.window == "auto" and row.window and len(row.window) == 2:
        return window_range(values, *row.window), img.size
    if opts.window in ("auto", "percentile"):
        return percentile_window(values), img.size
    return window_linear(values, *opts.window), img.size


def stamp_of(src, row, opts):
    """What a converted PNG was made from and how: a rerun reuses a PNG whose stamp matches."""
    return json.dumps({"from": os.path.abspath(src), "offset": row.offset, "window": row.window,
                       "flag_window": opts.window, "frame": opts.frame, "max_side": opts.max_side}, sort_keys=True)


def reused(dest, stamp):
    """The original size recorded in `dest` when `dest` was converted from the same source the same way."""
    try:
        with Image.open(dest) as img:
            if img.text.get("prepare") == stamp:
                return tuple(int(v) for v in img.text["source_size"].split(","))
    except Exception:  # absent, or cut short by a kill: convert again
        return None
    return None


def resized(pixels, max_side):
    img = Image.fromarray(pixels)
    W, H = img.size
    if max_side and max(W, H) > max_side:
        s = max_side / max(W, H)
        img = img.resize((max(1, round(W * s)), max(1, round(H * s))), Image.Resampling.LANCZOS)
    return img


def write_png(img, dest, stamp, source_size):
    """Atomically: a kill leaves either the finished PNG or none."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prepare", stamp)
    info.add_text("source_size", f"{source_size[0]},{source_size[1]}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.tmp"
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, dest)


def open_image(task):
    """One image -> {"image": path the JSONL names, "size": (W, H) of that file, "source_size": (W, H)
    of the original, "made": converted|reused|as is}, or {"reason": ...}, or {"fatal": ...}."""
    src, dest, row, opts = task
    try:
        stamp = stamp_of(src, row, opts)
        source_size = reused(dest, stamp)
        if source_size:
            with Image.open(dest) as img:
                return {"image": dest, "size": img.size, "source_size": source_size, "made": "reused"}
        if is_dicom(src):
            pixels = dicom_pixels(src, opts)
            source_size = (pixels.shape[1], pixels.shape[0])
        else:
            pixels, source_size = raster_pixels(src, row, opts)
            if pixels is None and not (opts.max_side and max(source_size) > opts.max_side):
                return {"image": os.path.abspath(src), "size": source_size, "source_size": source_size, "made": "as is"}
            if pixels is None:  # 8-bit, only to be made smaller
                pixels = np.asarray(read_image(src))
        img = resized(pixels, opts.max_side)
        write_png(img, dest, stamp, source_size)
        return {"image": dest, "size": img.size, "source_size": source_size, "made": "converted"}
    except LeftOut as e:
        return {"reason": str(e)}
    except PrepareError as e:
        return {"fatal": str(e)}
    except OSError as e:
        if not os.path.exists(src):
            return {"reason": MISSING}
        return {"fatal": f"{dest}: cannot write ({e.strerror})"} if e.filename in (dest, None) else {"reason": UNREADABLE}


class ImageIndex:
    """Finds the file a row names under --images: the path itself, the name with an image
    extension, or (built once, when those miss) the same file name anywhere below the folder."""

    def __init__(self, root):
        self.root, self.by_name = root, None
        self.real_root = os.path.realpath(root)

    def find(self, name):
        """The file, resolved (links followed) and inside --images; LeftOut otherwise."""
        path = self.search(name)
        real = os.path.realpath(path)
        if not real.startswith(self.real_root + os.sep):  # ../x, /abs/x, or a link inside that points out
            raise LeftOut(OUTSIDE_IMAGES)
        return real

    def search(self, name):
        direct = os.path.join(self.root, name)
        candidates = [direct] + [direct + ext for ext in DICOM_EXTS + IMAGE_EXTS]
        if "/" in name:  # --images given one level down (MIMIC-CXR-JPG's files/ itself)
            candidates.append(os.path.join(self.root, name.split("/", 1)[1]))
        hit = next((p for p in candidates if os.path.isfile(p)), None)
        if hit:
            return hit
        if self.by_name is None:
            self.by_name = defaultdict(list)
            for folder, _, files in os.walk(self.root):
                for f in files:
                    self.by_name[f].append(os.path.join(folder, f))
                    self.by_name[os.path.splitext(f)[0]].append(os.path.join(folder, f))
        found = self.by_name.get(os.path.basename(name), [])
        if len(found) > 1:
            raise LeftOut(AMBIGUOUS)
        if not found:
            raise LeftOut(MISSING)
        return found[0]


def converted_path(src, images_dir, out_dir, taken):
    """Where a converted copy of `src` (inside --images, resolved) goes: its path under --images,
    mirrored under OUT/images; `taken` {destination: source} keeps two sources from one file
    (x.dcm and x.png of one folder: the second gets its source's extension in its name)."""
    rel = os.path.relpath(src, os.path.realpath(images_dir))
    dest = os.path.join(os.path.abspath(out_dir), "images", os.path.splitext(rel)[0] + ".png")
    if taken.setdefault(dest, src) != src:
        dest = os.path.join(os.path.abspath(out_dir), "images", rel + ".png")
        taken[dest] = src
    return dest


def remove_half_written(out_dir):
    """PNGs a killed run left half written (write_png's temporary names): never read, removed."""
    for folder, _, files in os.walk(os.path.join(out_dir, "images")):
        for f in files:
            if f.endswith(".tmp"):
                os.remove(os.path.join(folder, f))


def open_images(by_image, opts):
    """{image name: open_image's answer} for every image some row points at, over --workers."""
    remove_half_written(opts.out)
    index, answers, tasks, taken = ImageIndex(opts.images), {}, [], {}
    for name, rows in by_image.items():
        try:
            src = index.find(name)
        except LeftOut as e:
            answers[name] = {"reason": str(e)}
            continue
        tasks.append((name, (src, converted_path(src, opts.images, opts.out, taken), rows[0], opts)))
    names = [n for n, _ in tasks]
    work = (t for _, t in tasks)
    with tqdm(total=len(tasks), desc="images", unit="img", disable=opts.quiet) as bar:
        if opts.workers > 1:
            with multiprocessing.get_context("fork").Pool(opts.workers) as pool:
                for name, answer in zip(names, pool.imap(open_image, work, chunksize=8)):
                    answers[name] = fatal_or(answer)
                    bar.update()
        else:
            for name, task in zip(names, work):
                answers[name] = fatal_or(open_image(task))
                bar.update()
    return answers


def fatal_or(answer):
    if "fatal" in answer:
        raise PrepareError(answer["fatal"])
    return answer


# ----------------------------------------------------------------------------- rows -> records
class Tally:
    """Rows left out, by reason, with a few file:line examples; --strict stops at bad input."""

    def __init__(self, strict):
        self.strict, self.count, self.examples = strict, Counter(), defaultdict(list)

    def add(self, where, reason):
        if self.strict and reason not in POLICY:
            raise PrepareError(f"{where}: {reason} (--strict: any row that cannot become a record stops the conversion)")
        self.count[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def to_json(self):
        return {r: {"count": n, "examples": self.examples[r]} for r, n in self.count.most_common()}


def iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def fuse(rows, fuse_iou):
    """Boxes of one finding on one image -> [(box, rows)], where boxes of *different* readers that
    overlap (IoU >= fuse_iou, transitively) are one lesion and become their coordinate mean."""
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(rows)):
        for j in range(i):
            if rows[i].reader and rows[j].reader and rows[i].reader != rows[j].reader \
                    and iou(rows[i].box, rows[j].box) >= fuse_iou:
                parent[root(i)] = root(j)
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[root(i)].append(r)
    return [(tuple(float(np.mean([r.box[k] for r in g])) for k in range(4)), g) for g in groups.values()]


def record_boxes(boxes, rule):
    """The multi-box rule: every box ("keep": a record of several boxes, METHOD.md 4.2), or one box:
    the only one, the union of the boxes, the largest one; None when several are skipped."""
    if rule == "keep" or len(boxes) == 1:
        return list(boxes)
    if rule == "union":
        return [(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))]
    if rule == "largest":
        return [max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))]
    return None


@dataclass(slots=True)
class Record:
    image: str
    query: str
    boxes: list             # one box, or with --multi-box keep all of the query's
    patient: str
    split: str
    rows: list


def image_records(rows, answer, opts, tally, merged):
    """The records of one image: its rows checked against the image, grouped by query (fused, then
    the multi-box rule), boxes scaled to the file the record points at."""
    if "reason" in answer:
        for r in rows:
            tally.add(r.where, answer["reason"])
        return []
    W, H = answer["source_size"]
    by_query = defaultdict(list)
    for r in rows:  # each row's stated size on its own: one wrong row does not take the image's others along
        if r.size and (round(r.size[0]), round(r.size[1])) != (W, H):
            tally.add(r.where, SIZE_MISMATCH)
        elif r.box[0] < 0 or r.box[1] < 0 or r.box[2] > W or r.box[3] > H:
            tally.add(r.where, OUTSIDE)
        else:
            by_query[opts.query.format(finding=r.finding)].append(r)
    sx, sy = answer["size"][0] / W, answer["size"][1] / H
    records = []
    for query, group in by_query.items():
        same = {}  # a row repeated (a duplicated COCO instance): one box, its rows all in the record
        for r in group:
            same.setdefault(tuple(r.box), r)
        lesions = fuse(list(same.values()), opts.fuse_iou)
        merged["duplicate"] += len(group) - len(same)
        merged["fused"] += len(same) - len(lesions)
        boxes = record_boxes([b for b, _ in lesions], opts.multi_box)
        if boxes is None or len(boxes) > MAX_BOXES:
            for r in group:
                tally.add(r.where, SEVERAL if boxes is None else TOO_MANY)
            continue
        scaled = [[round(v * s, 2) for v, s in zip(box, (sx, sy, sx, sy))] for box in boxes]
        records.append(Record(relative(answer["image"], opts.out), query, scaled, group[0].patient,
                              group[0].split, [r.where for r in group]))
    return records


def write_jsonl(records, out_dir, name="data.jsonl"):
    path = os.path.join(out_dir, name)
    write_whole(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))
    return path


def relative(path, out_dir):
    """An image by its path from OUT, the JSONL's folder, where the loader resolves it: the folder
    and the images beside it can move, be copied to a cluster or shared, together."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))


def assign_splits(records, opts):
    """{patient: split}: whole patients, shuffled by --seed and cut by the --split fractions, or the
    file's own split with --split official. A patient in two splits is an error, never written."""
    if opts.split == "official":
        seen = {}
        for r in records:
            if seen.setdefault(r.patient, r.split) != r.split:
                raise PrepareError(f"{r.rows[0]}: --split official puts patient {r.patient} in {seen[r.patient]} "
                                   f"and {r.split}; split by patient instead (--split 0.8,0.1,0.1)")
        return seen
    patients = sorted({r.patient for r in records})
    random.Random(opts.seed).shuffle(patients)
    n_train = round(opts.split[0] * len(patients))
    n_val = round((opts.split[0] + opts.split[1]) * len(patients)) - n_train
    return {p: SPLIT_NAMES[0 if i < n_train else 1 if i < n_train + n_val else 2] for i, p in enumerate(patients)}


def convert(fmt, annotations, opts):
    """The whole conversion; returns the report (also written to OUT/report.json)."""
    tally, by_image, rows_read = Tally(opts.strict), defaultdict(list), 0
    for path in annotations:
        for row in READERS[fmt](path, opts):
            rows_read += 1
            if row.reason:
                tally.add(row.where, row.reason)
            else:
                by_image[row.image].append(row)
    answers = open_images(by_image, opts)
    records, merged, made = [], Counter(), Counter()
    for name in list(by_image):  # rows and answers given up as their records are made: what is held shrinks
        answer = answers.pop(name)
        made[answer.get("made", "left out")] += 1
        records += image_records(by_image.pop(name), answer, opts, tally, merged)
    split_of = assign_splits(records, opts)
    out = {s: [r for r in records if split_of[r.patient] == s] for s in SPLIT_NAMES}
    report = {"format": fmt, "annotations": [os.path.abspath(p) for p in annotations], "images_dir": os.path.abspath(opts.images),
              "rows_read": rows_read, "rows_in_records": sum(len(r.rows) for r in records),
              "records": {s: len(out[s]) for s in SPLIT_NAMES},
              "patients": {s: len({r.patient for r in out[s]}) for s in SPLIT_NAMES},
              "left_out": tally.to_json(), "boxes_fused": merged["fused"], "boxes_duplicated": merged["duplicate"],
              "boxes_per_record": boxes_per_record(len(r.boxes) for r in records),
              "images": {k: made.get(k, 0) for k in ("converted", "reused", "as is", "left out")},
              "settings": settings_of(opts)}
    write_splits(out, report, opts.out, opts.multi_box == "keep")
    return report


def answer_field(boxes, keep):
    """A record's boxes as the loader reads them: field 'boxes' with --multi-box keep (every record:
    one data set, one task), else its one box as 'solution'."""
    return {"boxes": boxes} if keep else {"solution": boxes[0]}


def write_splits(out, report, out_dir, keep=False):
    """train/val/test.jsonl and report.json as one set: each written whole to a temporary file, and
    all renamed only once every one is written, so a full disk leaves an earlier conversion's set as
    it was (never a new train.jsonl beside old val, test and report)."""
    paths = [os.path.join(out_dir, f"{s}.jsonl") for s in SPLIT_NAMES] + [os.path.join(out_dir, "report.json")]
    try:
        for s, path in zip(SPLIT_NAMES, paths):
            with open(path + ".tmp", "w") as f:  # streamed: one line at a time
                f.writelines(json.dumps({"image": r.image, "problem": r.query, **answer_field(r.boxes, keep),
                                         "patient": r.patient, "rows": r.rows}) + "\n" for r in out[s])
        with open(paths[-1] + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
    except OSError as e:
        for path in paths:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        raise PrepareError(f"{out_dir}: could not write the splits ({reason_of(e)}); what was there before is as it was")
    for path in paths:
        os.replace(path + ".tmp", path)


def boxes_per_record(counts):
    """{"1": records of one box, "2": of two, ...}, in order of the count."""
    return {str(k): v for k, v in sorted(Counter(counts).items())}


def settings_of(opts):
    keys = ("query", "split", "seed", "multi_box", "fuse_iou", "window", "frame", "max_side", "group_by", "strict")
    return {k: getattr(opts, k) for k in keys}


def summary_lines(report, out_dir):
    r, n = report["records"], report["patients"]
    lines = [f"{report['format']}: {report['rows_read']:,} rows read, {report['rows_in_records']:,} in records",
             "records  " + ", ".join(f"{s} {r[s]:,} ({n[s]:,} patients)" for s in SPLIT_NAMES),
             "images   " + ", ".join(f"{k} {v:,}" for k, v in report["images"].items())]
    lines.append("boxes    " + ", ".join(f"{v:,} records of {k}" for k, v in report["boxes_per_record"].items()))
    if report["boxes_fused"]:
        lines.append(f"fused    {report['boxes_fused']:,} readers' boxes into the mean of an overlapping one")
    if report["boxes_duplicated"]:
        lines.append(f"merged   {report['boxes_duplicated']:,} boxes given twice for one query into one")
    for reason, v in report["left_out"].items():
        lines.append(f"left out {v['count']:,} rows: {reason}, e.g. {v['examples'][0]}")
    return lines + [f"wrote {', '.join(f'{s}.jsonl' for s in SPLIT_NAMES)} and report.json to {out_dir}", "next: "
                    + next_command(os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "val.jsonl"))]


def next_command(train, val):
    """The training command a prepared set is ready for (a real model: the tiny one knows only the
    synthetic images)."""
    return f"python train.py --dataset {train} --eval-dataset {val} --model Qwen/Qwen2.5-VL-3B-Instruct"


# ----------------------------------------------------------------------------- inspect
@dataclass
class Seen:
    """One record as inspect sees it: the loaded sample, the image file, its pixels' digest, the patient."""
    sample: object
    path: str
    digest: str
    patient: str


def read_for_inspect(path):
    """The records of a JSONL file through the training loader (so what is inspected is what trains)."""
    samples = load_jsonl(path)
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        objs = [json.loads(line) for line in f if line.strip()]
    return [Seen(s, os.path.realpath(os.path.join(root, o["image"])), hashlib.sha1(s.image().tobytes()).hexdigest(),
                 str(o.get("patient", ""))) for s, o in zip(samples, objs)]


def quantiles(values):
    a = np.asarray(values, np.float64)
    return {k: round(float(np.percentile(a, q)), 4) for k, q in (("min", 0), ("p10", 10), ("median", 50), ("p90", 90), ("max", 100))}


def file_summary(seen):
    samples = [x.sample for x in seen]
    boxes = [(box, s.image_size) for s in samples for box in s.truth()]  # every box, with its image's size
    W = [size[0] for _, size in boxes]
    H = [size[1] for _, size in boxes]
    w = [(b[2] - b[0]) for b, _ in boxes]
    h = [(b[3] - b[1]) for b, _ in boxes]
    border = sum(1 for b, size in boxes if min(b[:2]) <= 0 or b[2] >= size[0] or b[3] >= size[1])
    return {"records": len(samples), "images": len({x.path for x in seen}),
            "boxes_per_record": boxes_per_record(len(s.truth()) for s in samples),
            "patients": len({x.patient for x in seen}) if all(x.patient for x in seen) else None,
            "queries": dict(Counter(s.query for s in samples).most_common()),
            "image_sizes": dict(Counter(f"{a}x{b}" for a, b in (s.image_size for s in samples)).most_common()),
            "box_area_over_image": quantiles([a * b / (c * d) for a, b, c, d in zip(w, h, W, H)]),
            "box_width_over_image": quantiles([a / c for a, c in zip(w, W)]),
            "box_height_over_image": quantiles([b / d for b, d in zip(h, H)]),
            "boxes_touching_border": border}


def leaks(files):
    """Image files, pixels and patients that two of the files share: a leak between splits."""
    found = {}
    for kind, key in (("same_image_path", "path"), ("same_pixels", "digest"), ("same_patient", "patient")):
        owners = defaultdict(set)
        for name, seen in files.items():
            for x in seen:
                if getattr(x, key):
                    owners[getattr(x, key)].add(name)
        found[kind] = [{"value": v, "files": sorted(fs)} for v, fs in owners.items() if len(fs) > 1]
    return found


def draw_samples(seen, path, n, seed):
    """A grid of up to `n` random records: the image, its box in red and its query below."""
    picked = random.Random(seed).sample(seen, min(n, len(seen)))
    cols, side, text_h = 4, 256, 32
    grid = Image.new("RGB", (cols * side, math.ceil(len(picked) / cols) * (side + text_h)), "white")
    for i, x in enumerate(picked):
        img, s = x.sample.image(), x.sample
        scale = side / max(img.size)
        thumb = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
        for box in s.truth():
            ImageDraw.Draw(thumb).rectangle([v * scale for v in box], outline=(255, 0, 0), width=2)
        left_x, top = (i % cols) * side, (i // cols) * (side + text_h)
        grid.paste(thumb, (left_x, top))
        for k in range(2):  # the query on two lines of 42 characters
            ImageDraw.Draw(grid).text((left_x + 2, top + side + 2 + 14 * k), s.query[42 * k:42 * (k + 1)], fill=(0, 0, 0))
    grid.save(path)


def inspect_files(paths, out_dir, n_samples=16, seed=0):
    """DIR/summary.json (per file, and the leak check across them) and DIR/samples.png; returns the summary."""
    files = {path: read_for_inspect(path) for path in paths}
    summary = {"files": {p: file_summary(seen) for p, seen in files.items()}, "leaks": leaks(files)}
    os.makedirs(out_dir, exist_ok=True)
    write_json(summary, os.path.join(out_dir, "summary.json"), indent=1)
    draw_samples([x for seen in files.values() for x in seen], os.path.join(out_dir, "samples.png"), n_samples, seed)
    return summary


# ----------------------------------------------------------------------------- the built-in synthetic sets as files

def write_synth(kind, n, out_dir, split="train", seed=0):
    """Write `n` synthetic PNGs and a data.jsonl describing them (METHOD.md section 9 format)."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i, s in enumerate(SynthSet(kind, split, n, seed)):
        rel = os.path.join("images", f"{kind}_{split}_{i:05d}.png")
        s.image().save(os.path.join(out_dir, rel))
        boxes = [[round(v) for v in box] for box in s.truth()]
        records.append({"image": rel, "problem": s.query, **answer_field(boxes, s.boxes is not None)})
    return write_jsonl(records, out_dir)


# ----------------------------------------------------------------------------- classification (.npz)
def from_npz(npz_path, out_dir, names, split="train", ordinal=False):
    """A MedMNIST-style .npz ({split}_images (N, H, W[, 3]) uint8, {split}_labels (N[, 1])) ->
    PNGs + {split}.jsonl + labels.json (class names as given, in label-index order)."""
    if len(names) < 2 or len({n.lower() for n in names}) < len(names) or not all(names):
        raise DataError(f"--names {','.join(names)!r}: at least two distinct, non-empty class names")
    keys = (f"{split}_images", f"{split}_labels")
    images, labels = (read_npz_array(npz_path, k) for k in keys)
    labels = check_npz_arrays(npz_path, split, images, labels, len(names))
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (N, H, W, 1): grey
    classes = {"classes": list(names), "ordinal": ordinal}
    labels_path = os.path.join(out_dir, "labels.json")
    if os.path.exists(labels_path):  # another split of the same set may join it; another set may not
        try:
            other = read_labels(labels_path)
        except DataError:
            other = None
        if other is None or other.names != list(names) or other.ordinal != ordinal:
            raise DataError(f"{out_dir}: holds a conversion with other classes ({labels_path}); "
                            "convert into an empty folder")
    try:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        records = []
        for i, (img, y) in enumerate(zip(images, labels)):
            rel = os.path.join("images", f"{split}_{i:06d}.png")
            Image.fromarray(img).convert("RGB").save(os.path.join(out_dir, rel))
            records.append({"image": rel, "label": int(y)})
        write_json(classes, labels_path, indent=1)
        return write_jsonl(records, out_dir, f"{split}.jsonl")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write the converted set ({'disk full' if e.errno == errno.ENOSPC else e.strerror})")


MAX_NPZ_ARRAY_BYTES = 8 * 2 ** 30  # MedMNIST's largest split is well under this; a bigger header is not one


def read_npz_array(npz_path, key):
    """One array of a .npz archive, after checking from its header that it is what the archive
    really holds: a .npy file, a damaged archive or a header claiming more bytes than stored (or
    than MAX_NPZ_ARRAY_BYTES) is a DataError, not a traceback or an allocation of tens of GB."""
    try:
        regular_file(npz_path, "--npz")
        if not zipfile.is_zipfile(npz_path):
            raise DataError(f"{npz_path}: not a .npz archive (a .npy file, or damaged); expected numpy.savez output")
        with zipfile.ZipFile(npz_path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key not in names:
                raise DataError(f"{npz_path}: no array {key} (it holds {', '.join(sorted(names)) or 'none'})")
            info = z.getinfo(key + ".npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = header(f)
            claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if dtype.hasobject or claimed > min(info.file_size, MAX_NPZ_ARRAY_BYTES):
                raise DataError(f"{npz_path}: array {key} claims {shape} {dtype} ({claimed:,} bytes) but the "
                                f"archive stores {info.file_size:,}: damaged, or not a data array")
            with z.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except ValueError as e:  # not a regular file, or a header numpy cannot parse
        raise DataError(f"{npz_path}: {e}" if npz_path not in str(e) else str(e))
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{npz_path}: not a readable .npz ({type(e).__name__}: {str(e)[:120]})")


def check_npz_arrays(npz_path, split, images, labels, n_names):
    """The labels as a flat integer array, once the arrays are what MedMNIST ships: uint8 images
    (N, H, W), (N, H, W, 1) or (N, H, W, 3), and one integer label per image in 0..n_names-1."""
    where = f"{npz_path}: {split}_images {images.shape} {images.dtype}"
    if images.dtype != np.uint8 or not (images.ndim == 3 or images.ndim == 4 and images.shape[-1] in (1, 3)):
        raise DataError(f"{where}: expected uint8 pixels shaped (N, H, W), (N, H, W, 1) or (N, H, W, 3)")
    if labels.ndim > 2 or labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{npz_path}: {split}_labels {labels.shape}: one class per image expected, (N,) or (N, 1) "
                        "(a multi-label set is not a classification set)")
    labels = labels.reshape(-1)
    if len(labels) != len(images) or not len(labels):
        raise DataError(f"{where} and {split}_labels {labels.shape}: one label per image, at least one image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{npz_path}: {split}_labels are {labels.dtype}: integer class indices expected")
    if labels.min() < 0 or labels.max() >= n_names:
        raise DataError(f"{npz_path}: labels run {labels.min()}..{labels.max()}, but {n_names} names were given")
    return labels


def npz_splits(npz_path):
    """The splits a MedMNIST archive holds (train, val, test); an unreadable one is from_npz's error."""
    try:
        with zipfile.ZipFile(npz_path) as z:
            held = [s for s in SPLIT_NAMES if f"{s}_images.npy" in z.namelist()]
    except (OSError, zipfile.BadZipFile):
        held = []
    return held or ["train"]


# ----------------------------------------------------------------------------- command line
def fractions(text):
    if text == "official":
        return text
    parts = numbers(text.split(","))
    if not parts or len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r}: three fractions train,val,test that sum to 1 (e.g. 0.8,0.1,0.1), or official")
    return parts


def window_flag(text):
    if text in ("auto", "percentile"):
        return text
    parts = numbers(text.split(","))
    if not parts or len(parts) != 2 or parts[1] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: auto, percentile, or CENTER,WIDTH with WIDTH > 0 (modality units, e.g. 40,400 HU)")
    return parts


def bounded(kind, lo, hi=None):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text!r}: a {kind.__name__} in [{lo}, {hi if hi is not None else 'inf'})")
        return v
    return parse


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--images", required=True, help="the folder the annotation file's images are in (never written to)")
    common.add_argument("--out", required=True, help="writes train/val/test.jsonl, images/ (converted ones) and report.json")
    common.add_argument("--query", help="the query, with {finding} for the class name or sentence (default: per format)")
    common.add_argument("--split", type=fractions, default=[0.8, 0.1, 0.1],
                        help="train,val,test fractions of the patients (default 0.8,0.1,0.1), or official (" + ", ".join(OFFICIAL) + ")")
    common.add_argument("--seed", type=int, default=0, help="which patients go where (the same seed, the same split)")
    common.add_argument("--group-by", help="the field that names the patient (a column; a COCO image field); default: per format")
    common.add_argument("--multi-box", choices=("skip", "union", "largest", "keep"), default="skip",
                        help="a query with several boxes: left out (default: the one-box task of MedLoc-R1), their "
                             "union, the largest, or all kept (records of field 'boxes', trained as several boxes "
                             "per query: METHOD.md 4.2)")
    common.add_argument("--fuse-iou", type=bounded(float, 0.0, 1.0), default=0.5,
                        help="readers' boxes of one finding with IoU at least this are one lesion, their mean (VinDr)")
    common.add_argument("--window", type=window_flag, default="auto",
                        help="DICOM / 16-bit display window: auto (the file's VOI LUT or window, else percentile), percentile, or CENTER,WIDTH")
    common.add_argument("--frame", type=bounded(int, 0), help="the frame (from 0) to take from multi-frame DICOMs; they are left out otherwise")
    common.add_argument("--max-side", type=bounded(int, 28), help="resize images larger than this (boxes scaled with them)")
    common.add_argument("--workers", type=bounded(int, 1, 256), default=1, help="processes converting images")
    common.add_argument("--strict", action="store_true", help="stop at the first row that cannot become a record")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    for fmt in READERS:
        s = sub.add_parser(fmt, parents=[common], help=f"{fmt} annotations -> JSONL", description=READERS[fmt].__doc__)
        s.add_argument("annotations", nargs="+", help="the annotation file(s) (masks: the masks folder)")
    i = sub.add_parser("inspect", help="summary.json and samples.png of JSONL files, with a leak check across them")
    i.add_argument("files", nargs="+")
    i.add_argument("--out", required=True)
    i.add_argument("--samples", type=bounded(int, 1, 64), default=16)
    i.add_argument("--seed", type=int, default=0)
    y = sub.add_parser("synth", help="a built-in synthetic set (synth:KIND) as PNGs + OUT/data.jsonl, to look at or to edit")
    y.add_argument("--kind", default="mix", choices=GROUNDING_KINDS)
    y.add_argument("--n", type=bounded(int, 1), default=200)
    y.add_argument("--split", default="train", choices=tuple(SPLITS))
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--out", required=True)
    z = sub.add_parser("npz", help="MedMNIST-style .npz -> PNGs + JSONL + labels.json (classification), every split it holds")
    z.add_argument("npz")
    z.add_argument("--names", required=True, help="class names in label order, comma-separated")
    z.add_argument("--split", choices=SPLIT_NAMES, help="one split's arrays (default: every split the archive holds)")
    z.add_argument("--ordinal", action="store_true", help="the labels are grades in order")
    z.add_argument("--out", required=True)
    return p


def check_flags(a):
    """Flags that cannot work together, named before anything is read."""
    if not os.path.isdir(a.images):
        raise PrepareError(f"--images {a.images}: no such folder")
    out, images = os.path.realpath(a.out), os.path.realpath(a.images)
    if out == images or out.startswith(images + os.sep):
        raise PrepareError(f"--out {a.out}: inside --images {a.images}; nothing is ever written there")
    if a.split == "official" and a.format not in OFFICIAL:
        raise PrepareError(f"--split official: only {', '.join(OFFICIAL)} carry a split of their own; give fractions")
    if a.group_by and a.format in NO_FIELDS:
        raise PrepareError(f"--group-by: a {a.format} set has no fields; its images are the patients")
    a.query = a.query or QUERIES[a.format]
    try:
        a.query.format(finding="x")
    except (KeyError, IndexError, ValueError) as e:
        raise PrepareError(f"--query {a.query!r}: a template whose only field is {{finding}} ({first_line(e)})")


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        if a.format not in ("inspect", "synth", "npz"):
            check_flags(a)
        make_folder(a.out)
        with Lock(a.out, "prepare.py"):  # two conversions into one --out would mix their images
            return run(a)
    except (DataError, RunError) as e:
        raise SystemExit(f"error: {e}")


def run(a):
    """The subcommand `a.format`, holding --out."""
    if a.format == "inspect":
        summary = inspect_files(a.files, a.out, a.samples, a.seed)
        for path, s in summary["files"].items():
            print(f"{path}: {s['records']:,} records, {s['images']:,} images, {len(s['queries'])} queries")
        shared = {k: len(v) for k, v in summary["leaks"].items()}
        print("leaks across files: " + ", ".join(f"{k} {v}" for k, v in shared.items()))
        return summary
    if a.format == "synth":
        try:
            path = write_synth(a.kind, a.n, a.out, a.split, a.seed)
        except OSError as e:  # a full disk: the images written so far stay, no half-written JSONL
            raise PrepareError(f"{a.out}: could not write the synthetic set ({reason_of(e)})")
        print(f"wrote {path}\nnext: python train.py --dataset {path}")
        return None
    if a.format == "npz":
        for s in [a.split] if a.split else npz_splits(a.npz):
            print(from_npz(a.npz, a.out, [n.strip() for n in a.names.split(",")], s, a.ordinal))
        return None
    print(f"prepare.py {a.format}: {', '.join(a.annotations)} with the images of {a.images} -> {a.out}", flush=True)
    report = convert(a.format, a.annotations, a)
    print("\n".join(summary_lines(report, a.out)))
    if not sum(report["records"].values()):  # the report is written: it says why
        reasons = ", ".join(f"{v['count']:,} {k}" for k, v in report["left_out"].items()) or "no rows"
        raise PrepareError(f"{a.annotations[0]}: no row became a record ({reasons}); {a.out}/report.json lists them")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
