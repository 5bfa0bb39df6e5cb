"""Nothing lost, mixed or read from elsewhere without a word (docs/checks.md): two commands on one
folder, the splits as one set, paths that lead out of --images, images too large to decode, damaged
sharded checkpoints. ablate.py's own cases are in tests/test_ablate.py, the trackers' in test_trackers.py."""
import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

import files
import prepare
from test_prepare import accounted, error_of, jsonl, run


def coco_file(path, names, size=(50, 40)):
    """A COCO file with one box per image, the images named as given."""
    images = [{"id": i, "file_name": n, "width": size[0], "height": size[1]} for i, n in enumerate(names)]
    annotations = [{"image_id": i, "category_id": 1, "bbox": [2, 3, 10, 12]} for i in range(len(names))]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    return path


def picture(path, size, value):
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_a_second_prepare_into_one_out_is_refused_while_the_first_writes(tmp_path):
    picture(tmp_path / "img" / "a.png", (50, 40), 10)
    coco = coco_file(tmp_path / "c.json", ["a.png"])
    os.makedirs(tmp_path / "o")
    with files.Lock(str(tmp_path / "o"), "prepare.py"):
        message = error_of("coco", coco, "--images", tmp_path / "img", "--out", tmp_path / "o", "--quiet")
    assert f"{tmp_path / 'o'} is in use by another prepare.py" in message
    assert not (tmp_path / "o" / "train.jsonl").exists()
    (tmp_path / "file").write_text("x")
    assert "a file, not a folder" in error_of("coco", coco, "--images", tmp_path / "img", "--out", tmp_path / "file")
    assert "cannot create it" in error_of("coco", coco, "--images", tmp_path / "img", "--out", tmp_path / "file" / "o")


def test_a_full_disk_while_writing_the_splits_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    for i in range(10):
        picture(tmp_path / "img" / f"{i}.png", (50, 40), i)
    coco = coco_file(tmp_path / "c.json", [f"{i}.png" for i in range(10)])
    argv = ["coco", coco, "--images", tmp_path / "img", "--out", tmp_path / "o", "--quiet"]
    run(*argv)
    before = {n: (tmp_path / "o" / n).read_bytes() for n in ("train.jsonl", "val.jsonl", "test.jsonl", "report.json")}

    def full(*args, **kwargs):  # the last of the four files cannot be written
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(prepare.json, "dump", full)
    message = error_of(*argv, "--seed", "3")  # another split: every file would change
    assert "could not write the splits (disk full)" in message
    assert {n: (tmp_path / "o" / n).read_bytes() for n in before} == before
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith(".tmp")]


def test_images_named_outside_images_are_left_out_and_counted(tmp_path):
    picture(tmp_path / "img" / "in.png", (50, 40), 10)
    picture(tmp_path / "outside" / "x.png", (50, 40), 20)
    os.symlink(tmp_path / "outside" / "x.png", tmp_path / "img" / "link.png")
    names = ["in.png", "../outside/x.png", str(tmp_path / "outside" / "x.png"), "link.png"]
    report, splits = run("coco", coco_file(tmp_path / "c.json", names), "--images", tmp_path / "img",
                         "--out", tmp_path / "o", "--split", "1,0,0", "--quiet")
    assert [os.path.basename(r["image"]) for r in splits["train"]] == ["in.png"]
    assert report["left_out"][prepare.OUTSIDE_IMAGES]["count"] == 3 and accounted(report)
    message = error_of("coco", tmp_path / "c.json", "--images", tmp_path / "img", "--out", tmp_path / "o2", "--strict")
    assert prepare.OUTSIDE_IMAGES in message


def test_two_sources_of_one_converted_name_never_share_its_file(tmp_path):
    picture(tmp_path / "img" / "s16.png", (80, 60), 50)   # converted (made smaller), to images/s16.png
    picture(tmp_path / "img" / "s16.bmp", (80, 60), 200)  # the same name, another image
    report, splits = run("coco", coco_file(tmp_path / "c.json", ["s16.png", "s16.bmp"], (80, 60)), "--images",
                         tmp_path / "img", "--out", tmp_path / "o", "--split", "1,0,0", "--max-side", "30", "--quiet")
    records = {os.path.basename(r["image"]): r for r in splits["train"]}
    assert len(records) == 2 and report["images"]["converted"] == 2
    means = {name: int(np.asarray(Image.open(tmp_path / "o" / r["image"])).mean()) for name, r in records.items()}
    assert sorted(means.values()) == [50, 200]  # each record's file is its own source's pixels
    assert jsonl(tmp_path / "o" / "train.jsonl") == splits["train"]


def test_a_row_stating_a_wrong_size_leaves_out_only_itself(tmp_path):
    """MS-CXR: two sentences on one image, one row stating another size: the correct row stays."""
    header = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
    rows = ["a,Pneumonia,Left lower lobe opacity.,files/p10/p10000032/s1/a.jpg,10,20,30,40,100,120",
            "a,Edema,Mild edema.,files/p10/p10000032/s1/a.jpg,0,0,50,60,99,99"]
    picture(tmp_path / "mimic" / "files" / "p10" / "p10000032" / "s1" / "a.jpg", (100, 120), 90)
    (tmp_path / "ms.csv").write_text("\n".join([header] + rows) + "\n")
    report, splits = run("mscxr", tmp_path / "ms.csv", "--images", tmp_path / "mimic", "--out", tmp_path / "o",
                         "--split", "1,0,0", "--quiet")
    assert [(r["problem"], r["solution"]) for r in splits["train"]] == [("Left lower lobe opacity.", [10.0, 20.0, 40.0, 60.0])]
    assert report["left_out"][prepare.SIZE_MISMATCH]["count"] == 1
    assert report["left_out"][prepare.SIZE_MISMATCH]["examples"][0].endswith(":3") and accounted(report)


def test_a_dicom_declaring_a_huge_image_is_left_out_before_decoding(tmp_path, monkeypatch):
    from dicom_files import write_dicom
    write_dicom(str(tmp_path / "img" / "ok.dcm"), np.full((40, 50), 7, np.uint16))
    write_dicom(str(tmp_path / "img" / "huge.dcm"), np.zeros((4, 5), np.uint16), Rows=20000, Columns=20000)
    import pydicom.dataset
    decode = pydicom.dataset.Dataset.pixel_array.fget

    def watched(ds):
        assert int(ds.Rows) * int(ds.Columns) <= 10 ** 8, "decoded a 400-megapixel image"
        return decode(ds)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(watched))
    report, splits = run("coco", coco_file(tmp_path / "c.json", ["ok.dcm", "huge.dcm"]), "--images", tmp_path / "img",
                         "--out", tmp_path / "o", "--split", "1,0,0", "--quiet")
    assert [os.path.basename(r["image"]) for r in splits["train"]] == ["ok.png"]
    assert report["left_out"][prepare.TOO_LARGE]["count"] == 1 and accounted(report)


def test_a_sharded_checkpoint_without_its_model_or_with_a_longer_shard_is_skipped_not_a_traceback(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    import rundir
    folder = tmp_path / "checkpoint-000002"
    os.makedirs(folder / "model")
    (folder / "model" / "config.json").write_text("{}")
    torch.save({"step": 2}, folder / "trainer_state.pt")
    dcp.save({"w": torch.arange(12.0)}, checkpoint_id=str(folder / "sharded"), no_dist=True)
    assert rundir.read_checkpoint(str(folder))["step"] == 2
    shard = next(p for p in (folder / "sharded").iterdir() if p.suffix == ".distcp")
    with open(shard, "ab") as f:
        f.write(b"\0" * 64)  # another layout's shard: longer than this metadata's
    with pytest.raises(files.RunError, match="longer than its metadata says"):
        rundir.read_checkpoint(str(folder))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 64)
    os.remove(folder / "model" / "config.json")
    with pytest.raises(files.RunError, match="model/config.json is missing"):
        rundir.read_checkpoint(str(folder))
    assert rundir.latest_intact(str(tmp_path))[0] is None  # skipped, said, never loaded
