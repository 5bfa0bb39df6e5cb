"""The built-in synthetic data: images of three modalities with one lesion each and its tight box
(grounding), and skin images with graded or typed spots (classification). Plain numpy and PIL; a
sample is a pure function of (kind, split, index, seed), so every run and machine sees the same set.

data.py wraps these into data sets (`synth:derm|xray|us|mix`, `synth:multi` with one to three lesions
an image, `synth:grade|type`).
"""
import math

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("derm", "xray", "us")
GROUNDING_KINDS = KINDS + ("mix", "multi")  # synth:KIND of grounding: the three, interleaved, several boxes
SPLITS = {"train": 0, "test": 1}  # the seed stream of each split
# Queries of one length and landscape images only: a randomly initialised tiny model has rotary
# positions alone to tell where an image token sits, and it learns that in minutes only when the
# token grid (3 x 4 here) and the distance from image to answer do not change between samples.
QUERIES = {"derm": "Locate the skin lesion.", "xray": "Locate the bright spot.",
           "us": "Locate the dark nodule."}
# Original sizes vary (160-400 px wide) but each modality keeps one aspect ratio, as real data
# sets mostly do (HAM10000 is 4:3); all three resize to the same 84 x 112 model input.
ASPECT = {"derm": (4, 3), "xray": (4, 3), "us": (5, 4)}
SYNTH_SIZES = {"train": 2000, "test": 200}


def _smooth_noise(rng, W, H, cells, sigma=1.0):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((W, H), Image.BICUBIC)
    return np.clip(np.asarray(img), -sigma, sigma)


def _blob_mask(rng, W, H, area_frac, irregular):
    """Binary mask of a wobbly ellipse of about `area_frac` of the image, fully inside it."""
    aspect = rng.uniform(0.6, 1.6)
    r = math.sqrt(area_frac * W * H / math.pi)
    rx, ry = max(r * math.sqrt(aspect), 2.5), max(r / math.sqrt(aspect), 2.5)
    rx, ry = min(rx, W * 0.4), min(ry, H * 0.4)
    cx, cy = rng.uniform(rx + 2, W - rx - 2), rng.uniform(ry + 2, H - ry - 2)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    theta = np.arctan2((yy - cy) / ry, (xx - cx) / rx)
    wobble = 1 + sum(irregular * rng.uniform(0, 1) / k * np.cos(k * theta + rng.uniform(0, 6.3))
                     for k in (2, 3, 5))
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= wobble ** 2 * 0.9


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _blur(a, sigma):
    """Gaussian blur of a float image (PIL blurs only 8-bit images). torch only here: what reads the
    names of the sets (prepare.py, the flag checks) starts without it."""
    import torch
    from torchvision.transforms.functional import gaussian_blur
    size = 2 * math.ceil(3 * sigma) + 1
    t = torch.tensor(a, dtype=torch.float32)[None]
    return gaussian_blur(t, [size, size], [sigma, sigma])[0].numpy()


def _derm(rng, W, H):
    skin = np.array([rng.uniform(190, 235), rng.uniform(140, 185), rng.uniform(110, 155)], np.float32)
    img = skin + 18 * _smooth_noise(rng, W, H, 6)[..., None] + rng.normal(0, 4, (H, W, 1))
    mask = _blob_mask(rng, W, H, math.exp(rng.uniform(math.log(0.02), math.log(0.25))), 0.15)
    lesion = np.array([rng.uniform(60, 120), rng.uniform(35, 75), rng.uniform(25, 55)], np.float32)
    alpha = _blur(mask * rng.uniform(0.8, 0.95), 1.5)[..., None]
    img = img * (1 - alpha) + (lesion + 15 * _smooth_noise(rng, W, H, 12)[..., None]) * alpha
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 4)):  # hairs cross lesion and skin alike
        pts = [tuple(rng.uniform(0, [W, H])) for _ in range(3)]
        draw.line(pts, fill=(60, 40, 30), width=1)
    return pil, mask


def _xray(rng, W, H):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = 40 + 25 * _smooth_noise(rng, W, H, 4) + 20 * (1 - ((xx / W - 0.5) ** 2 + (yy / H - 0.5) ** 2))
    bones = Image.new("F", (W, H), 0.0)
    draw = ImageDraw.Draw(bones)
    for _ in range(rng.integers(1, 4)):  # elongated bright distractors
        x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
        ang, length, width = rng.uniform(0, math.pi), rng.uniform(0.4, 0.9) * max(W, H), rng.uniform(8, 22)
        draw.line([(x0 - math.cos(ang) * length / 2, y0 - math.sin(ang) * length / 2),
                   (x0 + math.cos(ang) * length / 2, y0 + math.sin(ang) * length / 2)],
                  fill=float(rng.uniform(35, 60)), width=int(width))
    img = img + _blur(np.asarray(bones), 3)
    mask = _blob_mask(rng, W, H, math.exp(rng.uniform(math.log(0.01), math.log(0.12))), 0.06)
    img = img + _blur(mask * rng.uniform(90, 130), 2.0)
    img = img + rng.normal(0, 6, (H, W))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB"), mask


def _us(rng, W, H):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    tissue = 110 + 30 * _smooth_noise(rng, W, H, 5)
    mask = _blob_mask(rng, W, H, math.exp(rng.uniform(math.log(0.015), math.log(0.15))), 0.1)
    tissue = tissue * (1 - _blur(mask * rng.uniform(0.65, 0.85), 3.0))  # dark, blurry-edged nodule
    speckle = _blur(rng.rayleigh(1.0, (H, W)).astype(np.float32), 0.8)
    depth_fade = 1.1 - 0.5 * yy / H
    img = np.clip(tissue * speckle * depth_fade, 0, 255).astype(np.uint8)
    return Image.fromarray(img).convert("RGB"), mask


GENERATORS = {"derm": _derm, "xray": _xray, "us": _us}


def synth_sample(kind, split, index, seed=0):
    """One deterministic synthetic sample; train and test draw from disjoint seed streams."""
    rng = np.random.default_rng([seed, KINDS.index(kind), SPLITS[split], index])
    W = int(rng.integers(160, 400))
    H = round(W * ASPECT[kind][1] / ASPECT[kind][0])
    image, mask = GENERATORS[kind](rng, W, H)
    query = QUERIES[kind]
    return image, query, tight_box(mask)


# ----------------------------------------------------------------------------- several lesions
MULTI_QUERY = "Locate every skin lesion."
MULTI_MAX = 3  # lesions per image: 1 to 3


def _apart(box, others, gap=4):
    """True when `box` keeps `gap` pixels from every box of `others` (lesions never touch)."""
    return all(box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1]
               for o in others)


def _derm_multi(rng, W, H):
    """A skin image with one to three separate lesions (smaller than the one-lesion set's, so that
    three fit), their tight boxes left to right."""
    skin = np.array([rng.uniform(190, 235), rng.uniform(140, 185), rng.uniform(110, 155)], np.float32)
    img = skin + 18 * _smooth_noise(rng, W, H, 6)[..., None] + rng.normal(0, 4, (H, W, 1))
    boxes = []
    for _ in range(int(rng.integers(1, MULTI_MAX + 1))):
        for _ in range(50):  # a place apart from the lesions already drawn
            mask = _blob_mask(rng, W, H, math.exp(rng.uniform(math.log(0.01), math.log(0.06))), 0.15)
            if _apart(tight_box(mask), boxes):
                break
        else:
            continue
        boxes.append(tight_box(mask))
        lesion = np.array([rng.uniform(60, 120), rng.uniform(35, 75), rng.uniform(25, 55)], np.float32)
        alpha = _blur(mask * rng.uniform(0.8, 0.95), 1.5)[..., None]
        img = img * (1 - alpha) + lesion * alpha
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), sorted(boxes)


def synth_multi_sample(split, index, seed=0):
    """(image, query, boxes) of one deterministic several-lesion sample (`synth:multi`)."""
    rng = np.random.default_rng([seed, 20, SPLITS[split], index])
    W = int(rng.integers(160, 400))
    image, boxes = _derm_multi(rng, W, round(W * 3 / 4))
    return image, MULTI_QUERY, boxes


# ----------------------------------------------------------------------------- classification
# `grade` is ordinal (a lesion grade 0-4 visible in the number and size of dark spots), `type` is
# not (four lesion types told apart by colour and shape); the number of classes of each.
CLASS_KINDS = {"grade": 5, "type": 4}
CLASS_SIZES = {"train": 1000, "test": 200}


def _spots(rng, W, H, count, radius, colour, irregular=0.0):
    """A skin-coloured image with `count` blurred blobs of `colour`."""
    skin = np.array([rng.uniform(195, 230), rng.uniform(150, 180), rng.uniform(120, 150)], np.float32)
    img = skin + 12 * _smooth_noise(rng, W, H, 6)[..., None] + rng.normal(0, 4, (H, W, 1))
    for _ in range(count):
        mask = _blob_mask(rng, W, H, math.pi * radius ** 2 / (W * H), irregular)
        alpha = _blur(mask * 0.9, 1.2)[..., None]
        img = img * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def synth_class_sample(kind, split, index, seed=0):
    """(image, label) of one deterministic sample; train and test draw from disjoint streams."""
    rng = np.random.default_rng([seed, 10 + list(CLASS_KINDS).index(kind), SPLITS[split], index])
    label = int(rng.integers(CLASS_KINDS[kind]))
    W = int(rng.integers(160, 320))
    H = W * 3 // 4
    if kind == "grade":  # grade g: g spots (4 or 5 at grade 4), growing with the grade
        count = label if label < 4 else int(rng.integers(4, 6))
        return _spots(rng, W, H, count, W * (0.05 + 0.015 * label), (70, 45, 35), 0.1 * label), label
    colour, radius, irregular = [((120, 80, 55), 0.12, 0.02), ((35, 25, 25), 0.16, 0.3),
                                 ((170, 165, 150), 0.15, 0.15), ((200, 40, 50), 0.06, 0.0)][label]
    return _spots(rng, W, H, 1, W * radius, colour, irregular), label
