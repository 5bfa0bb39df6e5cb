import json

import pytest

import eval as ev
import tasks
from data import Sample


def test_accuracy_and_pseudo_map_hand_computed():
    ious = [0.0, 0.5, 0.79, 0.8, 0.96]
    assert tasks.accuracy_at(ious, 0.5) == pytest.approx(4 / 5)
    assert tasks.accuracy_at(ious, 0.8) == pytest.approx(2 / 5)
    # thresholds 0.50..0.95: 0.5 passes 1; 0.79 passes 6 (<=0.75); 0.8 passes 7; 0.96 passes 10
    assert tasks.pseudo_map(ious) == pytest.approx((1 + 6 + 7 + 10) / (10 * 5))
    assert tasks.MAP_THRESHOLDS[0] == 0.5 and tasks.MAP_THRESHOLDS[-1] == 0.95 and len(tasks.MAP_THRESHOLDS) == 10
    assert tasks.accuracy_at([], 0.5) == 0.0


def test_summarize_and_size_bins():
    m = tasks.summarize([1.0, 0.0], [False, True])
    assert m == {"A@0.5": 0.5, "A@0.8": 0.5, "mAP": 0.5, "mIoU": 0.5, "parse_fail": 0.5, "n": 2}
    s = lambda box: Sample(None, "q", box, (100, 100), "")
    assert [tasks.size_bin(s(b)) for b in [(0, 0, 10, 39), (0, 0, 20, 20), (0, 0, 39, 40), (0, 0, 40, 40)]] == \
        ["small", "medium", "medium", "large"]  # bins: [0, 4 %), [4 %, 16 %), 16 % and up


def test_eval_cli_writes_metrics_and_pictures(tmp_path, capsys):
    out = tmp_path / "m.json"
    ev.main(["--model", "tiny", "--dataset", "synth:derm", "--n", "5", "--out", str(out), "--save-vis", "2"])
    m = json.loads(out.read_text())
    # a random model writes no box: every metric is 0 and every answer a parse failure
    assert (m["A@0.5"], m["A@0.8"], m["mAP"], m["mIoU"], m["parse_fail"], m["n"]) == (0, 0, 0, 0, 1, 5)
    assert set(m["by_size"]) == {"small", "medium", "large"}
    assert sum(v["n"] for v in m["by_size"].values()) == 5
    assert len(list((tmp_path / "m_vis").glob("*.png"))) == 2
    assert "parse_fail" in capsys.readouterr().out


def test_eval_cli_bad_dataset_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: field 'problem'"):
        ev.main(["--model", "tiny", "--dataset", str(bad)])


def test_eval_out_in_folders_that_do_not_exist_yet_is_written_there(tmp_path, capsys):
    out, preds = tmp_path / "new" / "deeper" / "m.json", tmp_path / "other" / "p.jsonl"
    ev.main(["--model", "tiny", "--dataset", "synth:derm", "--n", "2", "--out", str(out), "--predictions", str(preds)])
    assert json.loads(out.read_text())["n"] == 2 and len(preds.read_text().splitlines()) == 2
    said = capsys.readouterr().out
    assert f"wrote the metrics to {out}" in said and f"wrote 2 predictions to {preds}" in said
    lines = said.splitlines()
    assert lines[0] == "eval.py: tiny (qwen2_5_vl; boxes in pixels of the resized input) on cpu, 2 records of synth:derm"
    assert lines[lines.index("tiny on synth:derm: 2 samples") + 1].startswith("subset ")  # the table's title


@pytest.mark.parametrize("case", ["file in the way", "same file", "predictions a folder"])
def test_eval_outputs_that_cannot_be_written_are_refused_before_the_evaluation(tmp_path, case, monkeypatch):
    (tmp_path / "f").write_text("")
    out, preds, why = {
        "file in the way": (tmp_path / "f" / "m.json", None, f"--out {tmp_path / 'f' / 'm.json'}: {tmp_path / 'f'} is "
                                                             "a file, not a folder"),
        "same file": (tmp_path / "m.json", tmp_path / "m.json", f"--out and --predictions both name {tmp_path / 'm.json'}"),
        "predictions a folder": (None, tmp_path, f"--predictions {tmp_path}: a folder, not a file"),
    }[case]
    monkeypatch.setattr(ev, "load_vlm", lambda *a, **k: pytest.fail("the evaluation started"))
    flags = (["--out", str(out)] if out else []) + (["--predictions", str(preds)] if preds else [])
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "tiny", "--dataset", "synth:derm", "--n", "2"] + flags)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_eval_on_a_full_disk_says_so_in_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno
    import files
    preds = tmp_path / "p.jsonl"

    def full(path, write):
        with open(path + ".tmp", "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp")
    real = files.write_whole
    monkeypatch.setattr(ev, "write_whole", lambda path, write: real(path, lambda f: full(path, write)))
    with pytest.raises(SystemExit, match="error: cannot write .*p.jsonl \\(disk full\\)$"):
        ev.main(["--model", "tiny", "--dataset", "synth:derm", "--n", "2", "--predictions", str(preds)])
    assert list(tmp_path.iterdir()) == []


def test_eval_as_a_command_makes_the_missing_folders_of_out(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "results" / "m.json"
    done = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--dataset", "synth:derm", "--n", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert json.loads(out.read_text())["n"] == 1 and done.stdout.strip().splitlines()[-1] == f"wrote the metrics to {out}"
