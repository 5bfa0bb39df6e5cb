"""prepare.py through its command line: the field's annotation files (real rows in tests/data, and
hand-made files for every format), DICOM windowing checked by hand from the tags, the patient split,
the multi-box rules, every left-out row counted, a resume after kill -9, and inspect."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import prepare
from data import DataError, load_jsonl
from dicom_files import write_dicom

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NIH = os.path.join(HERE, "data", "nih_bbox_list_2017_excerpt.csv")
RSNA = os.path.join(HERE, "data", "rsna_stage_2_train_labels_excerpt.csv")
VINDR = os.path.join(HERE, "data", "vindr_annotations_train_excerpt.csv")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def run(*argv):
    """prepare.main, its report, and the records of each split as the training loader reads them."""
    report = prepare.main([str(a) for a in argv])
    out = argv[argv.index("--out") + 1]
    return report, {s: jsonl(os.path.join(out, f"{s}.jsonl")) for s in prepare.SPLIT_NAMES}


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        prepare.main([str(a) for a in argv])
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def csv_table(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def blank(path, size, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size).save(path)


def accounted(report):
    """Every row read is in a record or left out for a reason."""
    return report["rows_in_records"] + sum(v["count"] for v in report["left_out"].values()) == report["rows_read"]


def patients_apart(splits):
    owners = {}
    for s, records in splits.items():
        for r in records:
            assert owners.setdefault(r["patient"], s) == s, f"patient {r['patient']} in {owners[r['patient']]} and {s}"
    return owners


# ----------------------------------------------------------------------------- real rows: NIH, RSNA, VinDr
@pytest.fixture(scope="module")
def nih_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nih") / "images"
    for row in csv_table(NIH)[1:]:
        if not (folder / row[0]).exists():
            blank(str(folder / row[0]), (1024, 1024))
    return folder


def test_nih_rows_become_records_split_by_patient(nih_images, tmp_path):
    report, splits = run("nih", NIH, "--images", nih_images, "--out", tmp_path / "a", "--quiet")
    rows = csv_table(NIH)[1:]
    assert report["rows_read"] == len(rows) == 328 and accounted(report)
    records = [r for s in prepare.SPLIT_NAMES for r in splits[s]]
    assert sum(report["records"].values()) == len(records)
    # each record is its row's x, y, w, h as corners, the finding in its query, the image prefix its patient
    by_row = {r["rows"][0].rsplit(":", 1)[1]: r for r in records if len(r["rows"]) == 1}
    for line, row in enumerate(csv_table(NIH), 1):
        if str(line) in by_row:
            x, y, w, h = map(float, row[2:6])
            r = by_row[str(line)]
            assert r["solution"] == pytest.approx([x, y, x + w, y + h], abs=0.006)
            assert r["problem"] == f"Locate the {row[1].lower()} in this chest X-ray." and r["patient"] == row[0][:8]
    owners = patients_apart(splits)
    assert report["patients"] == {s: len({r["patient"] for r in splits[s]}) for s in prepare.SPLIT_NAMES}
    n = len(owners)
    assert report["patients"]["train"] == round(0.8 * n) and report["patients"]["val"] == round(0.9 * n) - round(0.8 * n)
    again, splits2 = run("nih", NIH, "--images", nih_images, "--out", tmp_path / "b", "--quiet")
    assert splits2 == splits  # the same seed, the same split
    _, other = run("nih", NIH, "--images", nih_images, "--out", tmp_path / "c", "--seed", "1", "--quiet")
    assert other["test"] != splits["test"]
    assert sorted(os.listdir(nih_images)) == sorted({row[0] for row in rows})  # nothing written into --images


def test_nih_resized_images_carry_their_boxes_along(nih_images, tmp_path):
    report, splits = run("nih", NIH, "--images", nih_images, "--out", tmp_path, "--max-side", "256", "--quiet")
    _, full = run("nih", NIH, "--images", nih_images, "--out", tmp_path / "full", "--quiet")
    assert report["images"]["converted"] == len({r[0] for r in csv_table(NIH)[1:]})
    for small, big in zip(splits["train"], full["train"]):
        assert small["image"].startswith("images/") and Image.open(tmp_path / small["image"]).size == (256, 256)
        assert small["solution"] == pytest.approx([v / 4 for v in big["solution"]], abs=0.01)
    assert len(load_jsonl(str(tmp_path / "train.jsonl"))) == report["records"]["train"]


@pytest.fixture(scope="module")
def rsna_images(tmp_path_factory):
    """RSNA's images are 1024 x 1024 8-bit DICOMs named by patientId (those with a box suffice)."""
    folder = tmp_path_factory.mktemp("rsna") / "images"
    for row in csv_table(RSNA)[1:]:
        path = folder / f"{row[0]}.dcm"
        if row[5] == "1" and not path.exists():
            write_dicom(str(path), np.zeros((1024, 1024), np.uint8), PatientID=row[0])
    return folder


def test_rsna_negatives_are_counted_and_several_boxes_follow_the_rule(rsna_images, tmp_path):
    rows = csv_table(RSNA)[1:]
    boxes = {}
    for line, row in enumerate(rows, 2):
        if row[5] == "1":
            x, y, w, h = map(float, row[1:5])
            boxes.setdefault(row[0], []).append((x, y, x + w, y + h))
    report, splits = run("rsna", RSNA, "--images", rsna_images, "--out", tmp_path / "skip", "--max-side", "128", "--quiet")
    single = {p for p, b in boxes.items() if len(b) == 1}
    assert report["left_out"][prepare.NEGATIVE]["count"] == sum(r[5] == "0" for r in rows) == 122
    assert report["left_out"][prepare.SEVERAL]["count"] == sum(len(b) for p, b in boxes.items() if p not in single)
    assert accounted(report) and {r["patient"] for s in splits.values() for r in s} == single
    for rule, pick in (("union", lambda b: [min(v[0] for v in b), min(v[1] for v in b), max(v[2] for v in b), max(v[3] for v in b)]),
                       ("largest", lambda b: max(b, key=lambda v: (v[2] - v[0]) * (v[3] - v[1])))):
        report, splits = run("rsna", RSNA, "--images", rsna_images, "--out", tmp_path / rule, "--multi-box", rule,
                             "--max-side", "128", "--quiet")
        got = {r["patient"]: r["solution"] for s in splits.values() for r in s}
        assert set(got) == set(boxes) and prepare.SEVERAL not in report["left_out"]
        for p, b in boxes.items():
            assert got[p] == pytest.approx([v / 8 for v in pick(b)], abs=0.01)  # 1024 -> 128
        assert report["images"]["converted"] + report["images"]["reused"] == len(boxes)


@pytest.fixture(scope="module")
def vindr_images(tmp_path_factory):
    """Blank PNGs named by image_id, large enough for every box of theirs (VinDr's are 2-3k pixels)."""
    folder = tmp_path_factory.mktemp("vindr") / "images"
    need = {}
    for row in csv_table(VINDR)[1:]:
        w, h = need.get(row[0], (2000, 2000))
        if row[6]:
            w, h = max(w, int(float(row[6])) + 1), max(h, int(float(row[7])) + 1)
        need[row[0]] = (w, h)
    for image_id, size in need.items():
        blank(str(folder / f"{image_id}.png"), size)
    return folder


def test_vindr_readers_boxes_fuse_into_their_mean(vindr_images, tmp_path):
    report, splits = run("vindr", VINDR, "--images", vindr_images, "--out", tmp_path, "--quiet")
    table = csv_table(VINDR)
    rows = table[1:]
    assert report["rows_read"] == len(rows) and accounted(report)
    assert report["left_out"][prepare.NEGATIVE]["count"] == sum(r[1] == "No finding" for r in rows)
    records = [r for s in splits.values() for r in s]
    fused = 0
    for r in records:
        mine = [table[int(w.rsplit(":", 1)[1]) - 1] for w in r["rows"]]
        assert {m[0] for m in mine} == {os.path.basename(r["image"])[:-4]} and len({m[1] for m in mine}) == 1
        assert len({m[3] for m in mine}) == len(mine)  # one box per reader in a fused lesion
        assert r["solution"] == pytest.approx([np.mean([float(m[4 + k]) for m in mine]) for k in range(4)], abs=0.006)
        fused += len(mine) - 1
    assert report["boxes_fused"] >= fused and fused > 0
    # the same finding's boxes that did not fuse are several lesions: left out under --multi-box skip
    assert report["left_out"][prepare.SEVERAL]["count"] > 0
    _, lone = run("vindr", VINDR, "--images", vindr_images, "--out", tmp_path / "nofuse", "--fuse-iou", "1", "--quiet")
    assert sum(len(s) for s in lone.values()) < len(records)  # without fusing, readers' boxes are several lesions


# ----------------------------------------------------------------------------- DICOM: windows by hand from the tags
def converted_pixels(tmp_path, dicom, *flags):
    """`dicom` through `prepare.py coco` (a one-image set), as the 8-bit pixels of the PNG written."""
    images = tmp_path / "dicoms"
    os.makedirs(images, exist_ok=True)
    shutil.copy(dicom, images / "x.dcm")
    ds = pydicom.dcmread(dicom)
    coco = {"images": [{"id": 1, "file_name": "x.dcm", "width": ds.Columns, "height": ds.Rows}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / f"out{len(os.listdir(tmp_path))}"
    report, splits = run("coco", tmp_path / "coco.json", "--images", images, "--out", out, "--split", "1,0,0", "--quiet", *flags)
    return np.asarray(Image.open(out / splits["train"][0]["image"])), report


def test_ct_rescale_then_percentile_window(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert "WindowCenter" not in ds  # no window of its own: the percentile window
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    expected = np.clip(np.round((hu - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    got, _ = converted_pixels(tmp_path, get_testdata_file("CT_small.dcm"))
    assert np.array_equal(got, expected)
    got, _ = converted_pixels(tmp_path, get_testdata_file("CT_small.dcm"), "--window", "40,400")  # a soft-tissue window in HU
    assert np.array_equal(got, np.clip(np.round(((hu - 39.5) / 399 + 0.5) * 255), 0, 255).astype(np.uint8))


def test_mr_window_from_its_tags_and_monochrome1_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    expected = np.clip(np.round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255).astype(np.uint8)
    got, _ = converted_pixels(tmp_path, get_testdata_file("MR_small.dcm"))
    assert np.array_equal(got, expected) and 0 < expected.mean() < 255
    ds.PhotometricInterpretation = "MONOCHROME1"  # higher values darker: shown inverted
    ds.save_as(tmp_path / "mono1.dcm")
    got, _ = converted_pixels(tmp_path, str(tmp_path / "mono1.dcm"))
    assert np.array_equal(got, 255 - expected)
    got, _ = converted_pixels(tmp_path, get_testdata_file("MR_small_RLE.dcm"))  # compressed, decoded by pydicom
    assert np.array_equal(got, expected)


def test_a_dicom_written_here_with_slope_intercept_and_exact_window(tmp_path):
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    write_dicom(str(tmp_path / "w.dcm"), raw, RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="1000",
                WindowWidth="4000", VOILUTFunction="LINEAR_EXACT")
    v = raw * 2.0 - 1000
    got, _ = converted_pixels(tmp_path, str(tmp_path / "w.dcm"))
    assert np.array_equal(got, np.clip(np.round(((v - 1000) / 4000 + 0.5) * 255), 0, 255).astype(np.uint8))


def test_multi_frame_needs_frame_and_a_missing_decoder_names_its_package(tmp_path):
    multi = get_testdata_file("SC_rgb_rle_2frame.dcm")
    images = tmp_path / "m"
    os.makedirs(images)
    shutil.copy(multi, images / "x.dcm")
    coco = {"images": [{"id": 1, "file_name": "x.dcm"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    message = error_of("coco", tmp_path / "c.json", "--images", images, "--out", tmp_path / "o1", "--quiet")
    assert "no row became a record (1 multi-frame DICOM (choose a frame with --frame))" in message
    with open(tmp_path / "o1" / "report.json") as f:  # written before the error: it says why
        report = json.load(f)
    assert report["left_out"] == {prepare.MULTI_FRAME: {"count": 1, "examples": [f"{tmp_path / 'c.json'}:annotations[0]"]}}
    report, splits = run("coco", tmp_path / "c.json", "--images", images, "--out", tmp_path / "o2", "--frame", "1",
                         "--split", "1,0,0", "--quiet")
    got = np.asarray(Image.open(tmp_path / "o2" / splits["train"][0]["image"]))
    assert np.array_equal(got, pydicom.dcmread(multi).pixel_array[1])
    from pydicom.pixels import get_decoder
    jls = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(pydicom.dcmread(jls).file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so its absence cannot be shown")
    shutil.copy(jls, images / "x.dcm")
    message = error_of("coco", tmp_path / "c.json", "--images", images, "--out", tmp_path / "o3", "--quiet")
    assert "x.dcm: its pixel data (JPEG-LS Lossless Image Compression) cannot be decoded here" in message
    assert message.endswith("pip install pylibjpeg pylibjpeg-libjpeg")


def test_a_dicom_with_a_malformed_element_is_left_out_as_unreadable_not_a_traceback(tmp_path):
    images = tmp_path / "d"
    os.makedirs(images)
    shutil.copy(get_testdata_file("badVR.dcm"), images / "bad.dcm")  # pydicom's: a frame count of '1A'
    shutil.copy(get_testdata_file("CT_small.dcm"), images / "good.dcm")
    coco = {"images": [{"id": 1, "file_name": "bad.dcm"}, {"id": 2, "file_name": "good.dcm"}],
            "annotations": [{"image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (1, 2)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    report, splits = run("coco", tmp_path / "c.json", "--images", images, "--out", tmp_path / "o", "--split", "1,0,0",
                         "--quiet")
    assert report["left_out"] == {prepare.UNREADABLE: {"count": 1, "examples": [f"{tmp_path / 'c.json'}:annotations[0]"]}}
    assert len(splits["train"]) == 1 and accounted(report)


# ----------------------------------------------------------------------------- hand-made files, every format
def test_deeplesion_16_bit_slices_windowed_and_its_official_split(tmp_path):
    images = tmp_path / "Images_png"
    stored = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64).astype(np.int32) + 32768  # how DeepLesion keeps HU
    hu = stored - 32768.0
    header = "File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes," \
             "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range," \
             "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test"
    lines = [header]
    for p, (kind, split, size) in enumerate([(4, 1, "64, 64"), (5, 2, "64, 64"), (-1, 3, "64, 64"), (1, 1, "32, 32")], 1):
        name = f"{p:06d}_01_01"
        os.makedirs(images / name)
        Image.fromarray(stored.astype(np.uint16)).save(images / name / "010.png")
        lines.append(f'{name}_010.png,{p},1,1,10,"1, 2, 3, 4","10.5, 12, 30, 40","5, 6",' 
                     f'"0.5, 0.5, 0.5",{kind},0,"9, 11","0.8, 0.8, 5","{size}","-175, 275",M,50,{split}')
    (tmp_path / "DL_info.csv").write_text("\n".join(lines) + "\n")
    report, splits = run("deeplesion", tmp_path / "DL_info.csv", "--images", images, "--out", tmp_path / "o",
                         "--split", "official", "--quiet")
    assert [[r["patient"] for r in splits[s]] for s in prepare.SPLIT_NAMES] == [["1"], ["2"], ["3"]]
    assert [splits[s][0]["problem"] for s in prepare.SPLIT_NAMES] == [
        "Locate the liver lesion in this CT slice.", "Locate the lung lesion in this CT slice.", "Locate the lesion in this CT slice."]
    assert splits["train"][0]["solution"] == [10.5, 12.0, 30.0, 40.0]
    assert report["left_out"][prepare.SIZE_MISMATCH]["count"] == 1  # the file says 32 x 32, the slice is 64 x 64
    got = np.asarray(Image.open(tmp_path / "o" / splits["train"][0]["image"]))
    assert np.array_equal(got, np.clip(np.round((hu - -175) / 450 * 255), 0, 255).astype(np.uint8))


def test_mscxr_sentences_subjects_and_stated_sizes(tmp_path):
    images = tmp_path / "mimic"
    header = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
    rows = [("a", "Pneumonia", "Patchy opacity in the left lower lobe.", "files/p10/p10000032/s1/a.jpg", 10, 20, 30, 40, 100, 120),
            ("b", "Edema", "Mild edema.", "files/p10/p10000032/s2/b.jpg", 0, 0, 50, 60, 100, 120),
            ("c", "Pneumothorax", "Small right apical pneumothorax.", "files/p11/p11000001/s3/c.jpg", 5, 5, 10, 10, 80, 80),
            ("c", "Pneumothorax", "Small right apical pneumothorax.", "files/p11/p11000001/s3/c.jpg", 50, 50, 10, 10, 80, 80),
            ("d", "Consolidation", "Consolidation.", "files/p12/p12000002/s4/d.jpg", 5, 5, 10, 10, 99, 99)]
    for r in rows:
        blank(str(images / r[3]), (r[8], r[9]) if r[0] != "d" else (80, 80), "RGB")
    (tmp_path / "ms.csv").write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    report, splits = run("mscxr", tmp_path / "ms.csv", "--images", images, "--out", tmp_path / "o", "--split", "0.5,0,0.5", "--quiet")
    records = [r for s in splits.values() for r in s]
    assert {r["problem"]: (r["patient"], r["solution"]) for r in records} == {
        "Patchy opacity in the left lower lobe.": ("p10000032", [10.0, 20.0, 40.0, 60.0]),
        "Mild edema.": ("p10000032", [0.0, 0.0, 50.0, 60.0])}
    assert report["left_out"][prepare.SEVERAL]["count"] == 2 and report["left_out"][prepare.SIZE_MISMATCH]["count"] == 1
    patients_apart(splits)
    assert "--split official needs the file's split column" in error_of(
        "mscxr", tmp_path / "ms.csv", "--images", images, "--out", tmp_path / "o2", "--split", "official")
    with_split = [header + ",split"] + [",".join(map(str, r)) + ("," + ("test" if r[0] == "b" else "train")) for r in rows]
    (tmp_path / "ms11.csv").write_text("\n".join(with_split) + "\n")  # v1.1.0 puts one subject in two splits here
    assert "puts patient p10000032 in train and test" in error_of(
        "mscxr", tmp_path / "ms11.csv", "--images", images, "--out", tmp_path / "o3", "--split", "official")


def test_coco_crowds_negatives_group_by_and_official_split(tmp_path):
    images = tmp_path / "img"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        blank(str(images / name), (50, 40), "RGB")
    cat = [{"id": 7, "name": "Polyp"}]

    def coco(ids, anns):
        return {"images": [{"id": i, "file_name": f"{i}.png", "width": 50, "height": 40, "patient": p} for i, p in ids],
                "annotations": anns, "categories": cat}
    for i, name in enumerate("abcd"):
        os.rename(images / f"{name}.png", images / f"{i + 1}.png")
    train = coco([(1, "P1"), (2, "P2")], [{"image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20]},
                                          {"image_id": 2, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1},
                                          {"image_id": 2, "category_id": 7, "bbox": [3, 3, 5, 5]},
                                          {"image_id": 2, "category_id": 7, "bbox": [20, 20, 5, 5]},
                                          {"image_id": 9, "category_id": 7, "bbox": [1, 1, 2, 2]}])
    test = coco([(3, "P3"), (4, "P3")], [{"image_id": 3, "category_id": 7, "bbox": [1, 1, 2, 2]}])
    (tmp_path / "instances_train.json").write_text(json.dumps(train))
    (tmp_path / "instances_test.json").write_text(json.dumps(test))
    files = [tmp_path / "instances_train.json", tmp_path / "instances_test.json"]
    report, splits = run("coco", *files, "--images", images, "--out", tmp_path / "o", "--split", "official",
                         "--group-by", "patient", "--multi-box", "union", "--quiet")
    assert [(r["patient"], r["solution"], r["problem"]) for r in splits["train"]] == [
        ("P1", [1.0, 2.0, 11.0, 22.0], "Locate the polyp in this image."), ("P2", [3.0, 3.0, 25.0, 25.0], "Locate the polyp in this image.")]
    assert [r["patient"] for r in splits["test"]] == ["P3"] and splits["val"] == []
    assert {k: v["count"] for k, v in report["left_out"].items()} == {prepare.CROWD: 1, prepare.UNKNOWN_ID: 1, prepare.NEGATIVE: 1}
    assert accounted(report)
    test["images"][0]["patient"] = "P1"  # now P1 is in both files: an official split that leaks is refused
    (tmp_path / "instances_test.json").write_text(json.dumps(test))
    message = error_of("coco", *files, "--images", images, "--out", tmp_path / "o2", "--split", "official", "--group-by", "patient")
    assert "--split official puts patient P1 in train and test" in message


def test_kvasir_bbox_json(tmp_path):
    images = tmp_path / "images"
    blank(str(images / "cju1.jpg"), (60, 50), "RGB")
    blank(str(images / "cju2.jpg"), (60, 50), "RGB")
    boxes = {"cju1": {"height": 50, "width": 60, "bbox": [{"label": "polyp", "xmin": 5, "ymin": 6, "xmax": 30, "ymax": 40}]},
             "cju2": {"height": 50, "width": 60, "bbox": []}}
    (tmp_path / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    report, splits = run("kvasir", tmp_path / "kavsir_bboxes.json", "--images", images, "--out", tmp_path / "o",
                         "--split", "1,0,0", "--quiet")
    assert [(r["problem"], r["solution"]) for r in splits["train"]] == [("Locate the polyp in this colonoscopy image.", [5.0, 6.0, 30.0, 40.0])]
    assert report["left_out"][prepare.NEGATIVE]["count"] == 1


def test_masks_tight_boxes_seeded_split_and_empty_masks_counted(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir(), masks.mkdir()
    for i in range(10):
        blank(str(images / f"case{i}.jpg"), (50, 40), "RGB")
        m = np.zeros((40, 50), np.uint8)
        m[5 + i:20, 10:30 + i] = 255
        Image.fromarray(m).save(masks / f"case{i}_segmentation.png")
    blank(str(images / "nomask.png"), (50, 40))
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(masks / "nomask.png")  # empty mask: a negative
    blank(str(images / "orphan.png"), (50, 40))
    report, splits = run("masks", masks, "--images", images, "--out", tmp_path / "o", "--query", "Locate the lesion.",
                         "--split", "0.8,0,0.2", "--quiet")
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (8, 0, 2)
    assert {tuple(r["solution"]) for s in splits.values() for r in s} == {(10.0, 5.0 + i, 30.0 + i, 20.0) for i in range(10)}
    assert {k: v["count"] for k, v in report["left_out"].items()} == {prepare.NEGATIVE: 1, prepare.NO_MASK: 1}


# ----------------------------------------------------------------------------- bad input
def test_a_header_that_is_not_the_formats_names_the_expected_columns(tmp_path, nih_images):
    message = error_of("rsna", NIH, "--images", nih_images, "--out", tmp_path / "o")
    assert "not a RSNA Pneumonia labels file: expected the columns patientId, x, y, width, height, Target" in message
    assert "the header holds Image Index, Finding Label" in message
    message = error_of("nih", NIH, "--images", nih_images, "--out", tmp_path / "o", "--group-by", "Patient ID")
    assert "missing Patient ID" in message


def bad_rows(tmp_path):
    images = tmp_path / "images"
    blank(str(images / "00000001_000.png"), (1024, 1024))
    blank(str(images / "00000002_000.png"), (1024, 1024))
    blank(str(images / "00000004_000.png"), (512, 512))
    (images / "00000003_000.png").write_bytes(b"\x89PNG not really")
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,",
             "00000001_000.png,Mass,10,10,20,20",      # 2: a record
             "00000002_000.png,Mass,ten,10,20,20",     # 3: not numeric
             "00000002_000.png,Nodule,10,10,0,20",     # 4: zero-size
             "00000002_000.png,Effusion,1010,90,20,20",  # 5: outside the 1024 x 1024 image
             "00000009_000.png,Mass,10,10,20,20",      # 6: image missing
             "00000003_000.png,Mass,10,10,20,20",      # 7: unreadable
             "00000004_000.png,Mass,10,10,20,20"]      # 8: resized: its box is in another frame
    (tmp_path / "bbox.csv").write_text("\n".join(lines) + "\n")
    return images, tmp_path / "bbox.csv"


def test_rows_that_cannot_be_records_are_counted_by_reason_with_file_and_line(tmp_path):
    images, path = bad_rows(tmp_path)
    report, splits = run("nih", path, "--images", images, "--out", tmp_path / "o", "--quiet")
    assert {k: v["examples"] for k, v in report["left_out"].items()} == {
        prepare.NOT_NUMERIC: [f"{path}:3"], prepare.ZERO_SIZE: [f"{path}:4"], prepare.OUTSIDE: [f"{path}:5"],
        prepare.MISSING: [f"{path}:6"], prepare.UNREADABLE: [f"{path}:7"], prepare.SIZE_MISMATCH: [f"{path}:8"]}
    assert report["rows_read"] == 7 and sum(report["records"].values()) == 1 and accounted(report)
    message = error_of("nih", path, "--images", images, "--out", tmp_path / "s", "--strict")
    assert message.startswith(f"error: {path}:3: {prepare.NOT_NUMERIC} (--strict")
    os.makedirs(tmp_path / "elsewhere")
    message = error_of("nih", path, "--images", tmp_path / "elsewhere", "--out", tmp_path / "none")  # the wrong folder
    assert message == (f"error: {path}: no row became a record (5 image missing, 1 box not numeric, 1 zero-size or "
                       f"inverted box); {tmp_path / 'none'}/report.json lists them")


def test_flags_are_checked_before_anything_is_read(tmp_path, nih_images):
    assert "--split official: only vindr, mscxr, coco, deeplesion" in error_of("nih", NIH, "--images", nih_images, "--out",
                                                                       tmp_path, "--split", "official")
    assert "inside --images" in error_of("nih", NIH, "--images", nih_images, "--out", nih_images / "out")
    assert "no such folder" in error_of("nih", NIH, "--images", tmp_path / "none", "--out", tmp_path / "o")
    assert "only field is {finding}" in error_of("nih", NIH, "--images", nih_images, "--out", tmp_path / "o", "--query", "Find {organ}")
    for flag, value in (("--split", "0.5,0.5,0.5"), ("--fuse-iou", "2"), ("--workers", "0"), ("--window", "40")):
        with pytest.raises(SystemExit):
            prepare.main(["nih", NIH, "--images", str(nih_images), "--out", str(tmp_path / "o"), flag, value])


def test_the_loader_refuses_a_normalised_box_among_pixel_boxes(tmp_path):
    blank(str(tmp_path / "a.png"), (100, 100))
    lines = [{"image": "a.png", "problem": "q", "solution": [10, 20, 50, 60]},
             {"image": "a.png", "problem": "q", "solution": [0.1, 0.2, 0.5, 0.6]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'solution': box \[0.1, 0.2, 0.5, 0.6\] \(xyxy\) is 0.4 x 0.4 "
                                        r"pixels, under one pixel wide or high; it looks normalised"):
        load_jsonl(str(tmp_path / "d.jsonl"))


# ----------------------------------------------------------------------------- large sets: a rerun after kill -9
def test_a_run_killed_mid_conversion_converts_only_what_is_missing(tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nodule"}]}
    for i in range(160):
        write_dicom(str(images / f"p{i:03d}.dcm"), rng.integers(0, 4096, (384, 384), dtype=np.uint16),
                    WindowCenter="2048", WindowWidth="4096")
        coco["images"].append({"id": i, "file_name": f"p{i:03d}.dcm", "width": 384, "height": 384})
        coco["annotations"].append({"image_id": i, "category_id": 1, "bbox": [10, 20, 30, 40]})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    argv = [sys.executable, os.path.join(ROOT, "prepare.py"), "coco", str(tmp_path / "coco.json"), "--images", str(images),
            "--workers", "2", "--quiet", "--out"]
    clean = subprocess.run(argv + [str(tmp_path / "clean")], capture_output=True, text=True, cwd=ROOT)
    assert clean.returncode == 0, clean.stderr
    proc = subprocess.Popen(argv + [str(tmp_path / "o")], cwd=ROOT, start_new_session=True)
    made = tmp_path / "o" / "images"
    deadline = time.time() + 120
    while time.time() < deadline and len([f for f in os.listdir(made) if f.endswith(".png")] if made.exists() else []) < 20:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len([f for f in os.listdir(made) if f.endswith(".png")])
    assert 20 <= done < 160 and not (tmp_path / "o" / "report.json").exists()
    again = subprocess.run(argv + [str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["images"]["reused"] >= done - 2 and report["images"]["reused"] + report["images"]["converted"] == 160
    for s in prepare.SPLIT_NAMES:
        assert (tmp_path / "o" / f"{s}.jsonl").read_text().replace(str(tmp_path / "o"), "") == \
            (tmp_path / "clean" / f"{s}.jsonl").read_text().replace(str(tmp_path / "clean"), "")
    assert sorted(os.listdir(made)) == sorted(os.listdir(tmp_path / "clean" / "images"))  # half-written files removed
    for name in os.listdir(made):
        assert np.array_equal(np.asarray(Image.open(made / name)), np.asarray(Image.open(tmp_path / "clean" / "images" / name)))


# ----------------------------------------------------------------------------- inspect, and the round trip through training
def test_inspect_agrees_with_the_report_and_finds_leaks(nih_images, tmp_path):
    report, splits = run("nih", NIH, "--images", nih_images, "--out", tmp_path / "o", "--quiet")
    files = [str(tmp_path / "o" / f"{s}.jsonl") for s in prepare.SPLIT_NAMES]
    summary = prepare.main(["inspect", *files, "--out", str(tmp_path / "look")])
    for s, path in zip(prepare.SPLIT_NAMES, files):
        got = summary["files"][path]
        assert got["records"] == report["records"][s] and got["patients"] == report["patients"][s]
        assert got["image_sizes"] == {"1024x1024": report["records"][s]}
        assert sum(got["queries"].values()) == report["records"][s]
    assert summary["leaks"] == {"same_image_path": [], "same_pixels": [
        {"value": summary["leaks"]["same_pixels"][0]["value"], "files": sorted(files)}], "same_patient": []}  # blank images alike
    assert json.loads((tmp_path / "look" / "summary.json").read_text()) == summary
    assert Image.open(tmp_path / "look" / "samples.png").size == (4 * 256, 4 * (256 + 32))
    leak = tmp_path / "o" / "leak.jsonl"  # beside the splits: its record names the image from there
    leak.write_text(json.dumps(splits["train"][0]) + "\n")
    found = prepare.main(["inspect", files[2], str(leak), "--out", str(tmp_path / "look2")])["leaks"]
    assert found["same_image_path"] == [] or found["same_image_path"][0]["files"] == sorted([files[2], str(leak)])
    found = prepare.main(["inspect", files[0], str(leak), "--out", str(tmp_path / "look3")])["leaks"]
    assert found["same_image_path"][0]["files"] == sorted([files[0], str(leak)]) and found["same_patient"]


def test_inspect_hand_counted_sizes_borders_and_areas(tmp_path):
    blank(str(tmp_path / "a.png"), (100, 50))
    Image.fromarray(np.full((20, 40), 7, np.uint8)).save(tmp_path / "b.png")
    lines = [{"image": "a.png", "problem": "q1", "solution": [0, 10, 50, 35], "patient": "A"},  # on the left edge
             {"image": "b.png", "problem": "q2", "solution": [10, 5, 20, 15], "patient": "B"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = prepare.main(["inspect", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "look")])["files"][str(tmp_path / "d.jsonl")]
    assert s["image_sizes"] == {"100x50": 1, "40x20": 1} and s["boxes_touching_border"] == 1 and s["patients"] == 2
    assert s["box_area_over_image"]["min"] == pytest.approx(0.125) and s["box_area_over_image"]["max"] == pytest.approx(0.25)
    assert s["queries"] == {"q1": 1, "q2": 1}


def test_prepare_then_train_then_eval_on_the_written_jsonl(nih_images, tmp_path):
    out = tmp_path / "nih"
    report, _ = run("nih", NIH, "--images", nih_images, "--out", out, "--max-side", "112", "--quiet")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trained = subprocess.run([sys.executable, "train.py", "--dataset", str(out / "train.jsonl"), "--eval-dataset",
                              str(out / "test.jsonl"), "--steps", "2", "--batch-prompts", "2", "--group-size", "2",
                              "--threads", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = subprocess.run([sys.executable, "eval.py", "--model", str(tmp_path / "run" / "final"), "--dataset",
                                str(out / "test.jsonl"), "--threads", "1", "--out", str(tmp_path / "eval.json")],
                               capture_output=True, text=True, cwd=ROOT, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == report["records"]["test"]
    assert len([json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]) == 2


def test_records_name_their_images_from_the_jsonl_folder_so_the_folder_and_images_can_move(nih_images, tmp_path,
                                                                                            capsys):
    """Images used as they are (not converted) sit outside --out: the records name them by a path
    relative to the JSONL's folder, and the set loads the same after the whole tree is moved."""
    import shutil
    tree = tmp_path / "tree"
    shutil.copytree(nih_images, tree / "images")
    report, splits = run("nih", NIH, "--images", tree / "images", "--out", tree / "set")
    assert report["images"]["as is"] > 0
    images = [r["image"] for s in prepare.SPLIT_NAMES for r in splits[s]]
    assert images and all(i.startswith("../images/") for i in images)
    said = capsys.readouterr().out.splitlines()
    assert said[-1] == (f"next: python train.py --dataset {tree / 'set' / 'train.jsonl'} --eval-dataset "
                        f"{tree / 'set' / 'val.jsonl'} --model Qwen/Qwen2.5-VL-3B-Instruct")
    before = [s.image_size for s in load_jsonl(str(tree / "set" / "train.jsonl"))]
    shutil.move(tree, tmp_path / "moved")
    after = load_jsonl(str(tmp_path / "moved" / "set" / "train.jsonl"))
    assert [s.image_size for s in after] == before and all(os.path.exists(s.path) for s in after)


def test_a_jsonl_naming_its_images_by_absolute_paths_still_loads(tmp_path):
    blank(str(tmp_path / "img" / "a.png"), (64, 48))
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "t.jsonl").write_text(json.dumps({"image": str(tmp_path / "img" / "a.png"), "problem": "q",
                                                          "solution": [1, 2, 30, 40]}) + "\n")
    [sample] = load_jsonl(str(tmp_path / "set" / "t.jsonl"))
    assert sample.image_size == (64, 48) and sample.box == (1, 2, 30, 40)


def test_coco_duplicates_merge_and_a_record_over_the_box_limit_is_left_out_with_its_reason(tmp_path):
    """An instance given twice is one true box (counted as merged); an image of 120 boxes for one
    query is a record train.py refuses (at most 100), so it is left out and counted, never written."""
    images = tmp_path / "img"
    blank(str(images / "1.png"), (300, 300), "RGB")
    blank(str(images / "2.png"), (300, 300), "RGB")
    many = [{"image_id": 2, "category_id": 7, "bbox": [2 * k, 2 * k, 3, 3]} for k in range(120)]
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300} for i in (1, 2)],
            "annotations": [{"image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20]}] * 2
            + [{"image_id": 1, "category_id": 7, "bbox": [50, 50, 10, 10]}] + many,
            "categories": [{"id": 7, "name": "Polyp"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    report, splits = run("coco", tmp_path / "instances.json", "--images", images, "--out", tmp_path / "o",
                         "--multi-box", "keep", "--split", "1,0,0")
    [record] = splits["train"]
    assert record["boxes"] == [[1.0, 2.0, 11.0, 22.0], [50.0, 50.0, 60.0, 60.0]] and len(record["rows"]) == 3
    assert report["boxes_duplicated"] == 1
    assert {k: v["count"] for k, v in report["left_out"].items()} == {prepare.TOO_MANY: 120} and accounted(report)
    assert len(load_jsonl(str(tmp_path / "o" / "train.jsonl"))) == 1  # what was written, train.py reads


def test_prepare_synth_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp")
    monkeypatch.setattr(prepare, "write_whole", full)
    message = error_of("synth", "--kind", "derm", "--n", "2", "--out", tmp_path / "s")
    assert message == f"error: {tmp_path / 's'}: could not write the synthetic set (disk full)"
    assert not [n for n in os.listdir(tmp_path / "s") if n.endswith(".tmp")]
