import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from data import DataError, SynthSet, load_dataset, load_jsonl


def write_png(path, w=40, h=30, mode="RGB"):
    arr = np.zeros((h, w, 3), np.uint8) if mode == "RGB" else np.zeros((h, w), np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    write_png(tmp_path / "a.png")  # 40 x 30
    return tmp_path


def test_both_record_shapes_and_relative_paths(folder):
    path = write_lines(folder / "d.jsonl", [
        json.dumps({"image": "a.png", "problem": "Locate the lesion.", "solution": [1, 2, 30, 20]}),
        json.dumps({"image": "a.png", "problem": "Q", "solution": "<answer>[0, 0, 40, 30]</answer>"}),
        json.dumps({"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>Find the nodule."}, {"from": "gpt", "value": "[5, 6, 7, 8]"}]}),
    ])
    s = load_jsonl(path)
    assert [x.box for x in s] == [(1, 2, 30, 20), (0, 0, 40, 30), (5, 6, 7, 8)]
    assert s[2].query == "Find the nodule."
    assert s[0].image_size == (40, 30) and s[0].image().size == (40, 30)
    assert s[1].source == f"{path}:2"


def test_image_root_overrides_the_jsonl_folder(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("jsonl")
    path = write_lines(other / "d.jsonl", [json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 1, 1]})])
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(path)
    assert len(load_jsonl(path, image_root=str(folder))) == 1


BAD = [
    ("{not json", "invalid JSON"),
    (json.dumps({"problem": "q", "solution": [0, 0, 1, 1]}), "field 'image'"),
    (json.dumps({"image": "a.png", "solution": [0, 0, 1, 1]}), "field 'problem'"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 1]}), "not 4 finite numbers"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, "a", 1]}), "not 4 finite numbers"),
    ('{"image": "a.png", "problem": "q", "solution": [0, 0, NaN, 1]}', "not 4 finite numbers"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": [5, 0, 5, 1]}), "x2 > x1"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": [0, 9, 5, 3]}), "y2 > y1"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 41, 10]}), "outside the 40x30 image"),
    (json.dumps({"image": "missing.png", "problem": "q", "solution": [0, 0, 1, 1]}), "file not found"),
    (json.dumps({"image": "broken.png", "problem": "q", "solution": [0, 0, 1, 1]}), "unreadable image"),
    (json.dumps({"image": "a.png", "problem": "q", "solution": "no box"}), "no box"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_each_bad_record_is_named_with_file_line_and_reason(folder, line, message):
    (folder / "broken.png").write_bytes(b"not a png")
    good = json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 1, 1]})
    path = write_lines(folder / "d.jsonl", [good, line])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert f"{path}:2: " in str(err.value) and message in str(err.value)
    assert "1 invalid record" in str(err.value)
    kept = load_jsonl(path, skip_invalid=True)
    assert len(kept) == 1


def test_one_line_per_distinct_problem_with_its_count_and_first_lines(folder):
    path = write_lines(folder / "d.jsonl", ["{bad"] * 25 + [
        json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 1, 1]})])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 25 invalid record(s) (use --skip-invalid to drop them):"
    assert lines[1:] == [f"  {path}:1: invalid JSON (Expecting property name enclosed in double quotes) "
                         "(25 records: lines 1, 2, 3, 4, 5, ...)"]
    distinct = [json.dumps({"image": "a.png", "problem": "q", "solution": [0] * (k + 5)}) for k in range(25)]
    path = write_lines(folder / "e.jsonl", distinct)  # 25 boxes of 5 to 29 numbers: 25 problems, 20 shown
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[20].startswith(f"  {path}:20: ") and lines[-1] == "  ... and 5 other problems"


def test_a_misspelt_field_is_named_with_the_field_meant(folder):
    path = write_lines(folder / "d.jsonl", [json.dumps({"image": "a.png", "problem": "q", "soluton": [0, 0, 1, 1]})] * 13)
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).splitlines()[1:] == [
        f"  {path}:1: field 'solution': missing (or give 'conversations'); the record has 'soluton': did you mean "
        "'solution'? (13 records: lines 1, 2, 3, 4, 5, ...)"]


def test_a_record_with_both_boxes_and_solution_is_refused(folder):
    path = write_lines(folder / "d.jsonl", [json.dumps({"image": "a.png", "problem": "q", "solution": [0, 0, 1, 1],
                                                        "boxes": [[0, 0, 1, 1]]})])
    with pytest.raises(DataError, match=r"d.jsonl:1: fields 'boxes' and 'solution' both given"):
        load_jsonl(path)


def test_skip_invalid_reports_and_empty_dataset_is_an_error(folder, capsys):
    path = write_lines(folder / "d.jsonl", ["{bad", "{worse"])
    with pytest.raises(DataError, match="empty"):
        load_jsonl(path, skip_invalid=True)
    assert "skipped 2 invalid record(s)" in capsys.readouterr().out
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write_lines(folder / "e.jsonl", []))


def test_grey_and_16_bit_pngs_become_rgb(tmp_path):
    grey = tmp_path / "g.png"
    write_png(grey, mode="L")
    deep = tmp_path / "d.png"
    a = np.zeros((8, 6), np.uint16)
    a[0, 0], a[1, 1] = 4095, 2048  # a 12-bit X-ray in a 16-bit PNG
    Image.fromarray(a).save(deep)
    assert data.read_image(grey).mode == "RGB"
    rgb = np.asarray(data.read_image(deep))
    assert rgb.shape == (8, 6, 3) and rgb[0, 0].tolist() == [255] * 3 and rgb[1, 1, 0] == 128


def test_synthetic_sets_are_deterministic_disjoint_and_varied():
    a, b = SynthSet("xray", "train", 6), SynthSet("xray", "train", 6)
    assert [s.box for s in a] == [s.box for s in b]
    assert np.array_equal(np.asarray(a[3].image()), np.asarray(b[3].image()))
    test = SynthSet("xray", "test", 6)
    train_images = {np.asarray(s.image()).tobytes() for s in a}
    assert not train_images & {np.asarray(s.image()).tobytes() for s in test}
    sizes = [s.image_size for s in a]
    assert any(w != h for w, h in sizes) and len(set(sizes)) > 1
    for s in a:
        x1, y1, x2, y2 = s.box
        W, H = s.image_size
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H and s.image().size == (W, H)


def test_mix_interleaves_kinds_and_specs_parse():
    mix = load_dataset("synth:mix", n=6)
    assert [s.source.split(":")[1] for s in mix] == ["derm", "xray", "us"] * 2
    assert load_dataset("synth:us:test", n=2)[0].source == "synth:us:test:0"
    assert load_dataset("synth:us", default_split="test", n=1)[0].source == "synth:us:test:0"
    with pytest.raises(DataError, match="unknown synthetic kind"):
        load_dataset("synth:ct")
    with pytest.raises(DataError, match="no such file"):
        load_dataset("nowhere.jsonl")


def test_synth_cli_writes_a_loadable_jsonl(tmp_path):
    prepare.main(["synth", "--kind", "us", "--n", "3", "--out", str(tmp_path)])
    s = load_jsonl(str(tmp_path / "data.jsonl"))
    ref = SynthSet("us", "train", 3)
    assert [x.box for x in s] == [tuple(float(round(v)) for v in r.box) for r in ref]


def test_train_size_keeps_the_first_n_records_of_a_file_or_a_built_in_set(folder):
    from data import SynthSet, first_records
    full = SynthSet("derm")
    part = first_records(full, 5, "synth:derm")
    assert len(part) == 5 and isinstance(part, SynthSet) and len(full) == 2000
    assert [s.box for s in part] == [full[i].box for i in range(5)] and [s.query for s in part[:2]] == [full[0].query] * 2
    with pytest.raises(IndexError):
        part[5]
    rows = [{"image": "a.png", "problem": f"q{k}", "solution": [0, 0, 1 + k, 1 + k]} for k in range(4)]
    samples = load_jsonl(write_lines(folder / "d.jsonl", [json.dumps(r) for r in rows]))
    assert [s.query for s in first_records(samples, 2, "d.jsonl")] == ["q0", "q1"]
    with pytest.raises(DataError, match="--train-size 5: d.jsonl holds 4 training records"):
        first_records(samples, 5, "d.jsonl")


def test_train_size_below_one_or_beyond_the_set_is_refused_before_anything_loads(tmp_path):
    import train
    with pytest.raises(SystemExit, match="--train-size 0: must be >= 1"):
        train.main(["--train-size", "0", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--train-size 2001: synth:mix holds 2,000 training records"):
        train.main(["--train-size", "2001", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
