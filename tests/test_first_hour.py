"""A newcomer's first hour (issue 42): mistakes refused before torch loads, each in one line with the
flag meant; --help generated from the tables that hold the families, the synthetic sets and the
ranges; a command that fails leaves no folder it made."""
import os
import subprocess
import sys

import pytest

import config
import train
from conftest import ROOT


def refused(script, *argv, cwd=ROOT):
    """(message, torch loaded?) of `script` run as a command with `argv` that it refuses."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}] + {list(argv)!r}\n"
             "try:\n"
             f"    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print(repr(str(e)), 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    *_, last = done.stdout.strip().splitlines() or [""]
    message, torch_loaded, transformers_loaded = last.rsplit(" ", 2)
    return eval(message) or done.stderr.strip(), torch_loaded == "True" or transformers_loaded == "True"


@pytest.mark.parametrize("argv, said", [
    (["--steps", "0"], "error: --steps 0: must be >= 1"),
    (["--dataset", "nope.jsonl"], "error: --dataset nope.jsonl: no such file (and not a synth:KIND spec)"),
    (["--dataset", "synth:dem"], "error: --dataset synth:dem: unknown synthetic kind 'dem': expected one of derm, "
                                 "xray, us, mix, multi, grade, type"),
    (["--model", "../models/qwen3_vll"], "error: --model ../models/qwen3_vll: not a model folder (no such folder)"),
    (["--max-resample", "3"], "error: --max-resample 3 without --dynamic-sampling: it bounds dynamic sampling's "
                              "extra rounds and would do nothing"),
    (["--dynamic-sampling", "--algo", "sft"], "error: --dynamic-sampling with --algo sft: supervised steps sample "
                                              "no groups to drop"),
    (["--out", "README.md"], "error: --out README.md: a file, not a folder; choose another --out"),
])
def test_train_refuses_a_flag_or_path_mistake_before_torch_loads(argv, said):
    message, loaded = refused("train.py", *argv)
    assert message == said and not loaded


@pytest.mark.parametrize("spelling, meant", [("--group_size", "--group-size"), ("--num_generations", "--group-size"),
                                             ("--learning_rate", "--lr"), ("--output_dir", "--out"),
                                             ("--bf16", "--precision bf16-mixed"), ("--stepz", "--steps")])
def test_another_tools_spelling_gets_the_flag_meant_in_one_line(spelling, meant, capsys):
    with pytest.raises(SystemExit):
        config.parse_args([spelling, "8"])
    assert capsys.readouterr().err == (f"train.py: error: unknown flag {spelling}: did you mean {meant}? "
                                       "(train.py --help lists every flag)\n")


def test_eval_refuses_a_missing_model_folder_before_torch_loads():
    message, loaded = refused("eval.py", "--model", "../nowhere/model", "--dataset", "synth:derm")
    assert message == "error: --model ../nowhere/model: not a model folder (no such folder)" and not loaded


def test_help_lists_every_family_every_synthetic_set_and_each_flags_range():
    from model import FAMILIES
    from synth import CLASS_KINDS, GROUNDING_KINDS
    helps = {a.dest: a.help for a in config.parser(config.help_tables())._actions}
    assert all(f"{family}," in helps["model"] or f"{family}, or" in helps["model"] for family in FAMILIES)
    assert f"synth:{'|'.join(GROUNDING_KINDS)} (grounding)" in helps["dataset"]
    assert f"synth:{'|'.join(CLASS_KINDS)} (--task classify)" in helps["dataset"]
    for name, (_, words) in config.RANGES.items():
        assert f"; allowed: {words}" in helps[name], name
    for f in config.dataclasses.fields(config.Config):
        assert helps[f.name].count("default") <= 1 and "{" not in helps[f.name].replace("{run}", ""), f.name
        assert f.type is bool or "default" in helps[f.name], f.name


def test_a_failed_run_leaves_no_folder_it_made_and_keeps_one_the_user_made(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "problem": "q", "soluton": [1, 2, 3, 4]}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="did you mean 'solution'"):
        train.main(["--dataset", str(bad), "--eval-dataset", "none", "--steps", "1"])  # default --out: runs/...
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit):
        train.main(["--dataset", str(bad), "--eval-dataset", "none", "--steps", "1", "--out", "mine/a/run"])
    assert os.listdir(tmp_path / "mine") == []
    with pytest.raises(SystemExit):
        train.main(["--dataset", str(bad), "--eval-dataset", "none", "--steps", "1", "--out", "mine"])
    assert os.listdir(tmp_path / "mine") == []  # the user's folder stays, emptied of nothing it held


def test_a_run_says_first_where_everything_goes_and_last_what_it_wrote(tmp_path, capsys):
    import prepare
    prepare.main(["synth", "--kind", "derm", "--n", "4", "--out", str(tmp_path / "data")])
    run = str(tmp_path / "run")
    capsys.readouterr()
    train.main(["--dataset", str(tmp_path / "data" / "data.jsonl"), "--eval-dataset", "none", "--steps", "1",
                "--batch-prompts", "2", "--group-size", "2", "--threads", "1", "--out", run])
    said = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert said[0] == f"run folder  {run}: metrics.jsonl and curves.png as it goes, checkpoint-N/, final/ (the model), eval.json"
    assert said[1] == "model       tiny (qwen2_5_vl; boxes in pixels of the resized input) on cpu, fp32"
    assert said[2] == f"data        {tmp_path / 'data' / 'data.jsonl'}: 4 training records; evaluation: none"
    assert said[3] == "method      GRPO, B=2 x G=2, schedule medloc, 1 steps"
    assert said[4].startswith("no evaluation at the end: --eval-dataset none")
    assert said[5].startswith("note: the built-in tiny model knows only the synthetic images")
    assert said[-1] == f"wrote {run}: final/, metrics.jsonl, curves.png, checkpoint-000001 (resumable with --resume {run})"


def test_curves_are_two_rows_of_panels_and_the_kl_is_in_its_legend(tmp_path):
    import json
    import rundir
    from PIL import Image
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "tau": 0.3, "hit_rate": 0.5, "r_bar": 0.5, "sigma": 0.1, "P": 0.8,
                                "S": 0.2, "m_bar": 0.2, "reward_mean": 1.5, "kl": 0.01, "entropy": 0.4}) + "\n")
    legends = rundir.plot_curves(str(tmp_path), margin=0.1)
    assert legends["reward and KL"] == ["reward_mean (10-step mean)", "kl (10-step mean, right axis)"]
    assert legends["window: margin check"] == ["m_bar", "Delta = 0.1"]
    width, height = Image.open(tmp_path / "curves.png").size
    assert len(legends) == 5 and width / height < 2  # 3 x 2 panels, not a 5 x 1 strip


def test_save_vis_draws_truth_and_prediction_in_two_colours_at_a_readable_size(tmp_path):
    import eval as ev
    from data import load_dataset
    from PIL import Image
    samples = load_dataset("synth:derm:test", n=1)
    truth = samples[0].box
    shifted = (truth[0] + 5, truth[1], truth[2] + 5, truth[3])
    from reward import iou
    ev.save_visualisations(samples, [{"box": shifted, "iou": iou(shifted, truth), "parse_fail": False}], 1, str(tmp_path))
    [png] = list(tmp_path.iterdir())
    img = Image.open(png).convert("RGB")
    assert 512 <= max(img.size) <= 1024 and png.name == f"0000_iou{iou(shifted, truth):.2f}.png"
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (0, 200, 0) in colours and (230, 0, 0) in colours  # the truth's green, the prediction's red


def test_a_failed_run_keeps_its_folder_once_it_holds_a_config_or_a_warm_start(tmp_path, monkeypatch):
    """A run that stops after its config.json is written (resumable: it starts again with its
    settings) or after its warm start's model is saved keeps its folder."""
    import start
    run = tmp_path / "run"

    def fail_after_config(cfg, run_dir, *a, **k):
        (run / "config.json").write_text("{}")
        raise train.RunError("stopped for the test")
    monkeypatch.setattr(start, "begin", fail_after_config)
    with pytest.raises(SystemExit, match="stopped for the test"):
        train.main(["--dataset", "synth:derm", "--eval-dataset", "none", "--steps", "1", "--out", str(run)])
    assert (run / "config.json").exists()
