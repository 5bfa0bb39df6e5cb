"""ablate.py's bookkeeping: finished runs are not redone, and the tables average the right runs."""
import argparse
import json
import os
from pathlib import Path

import pytest

import ablate


def fake_run(folder, a05, taus=None):
    os.makedirs(folder, exist_ok=True)
    m = {"A@0.5": a05, "A@0.8": a05 / 2, "mAP": a05 / 3, "mIoU": a05 / 4, "parse_fail": 0.0, "n": 10,
         "by_size": {}}
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(m, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, tau in enumerate(taus or [], 1):
            f.write(json.dumps({"step": step, "tau": tau, "hit_rate": 0.5,
                                "frac_equal_groups": 1.0 if step <= 2 else 0.0}) + "\n")


def test_mean_std_in_percent():
    assert ablate.mean_std([0.5, 0.7]) == "60.0 ± 10.0"
    assert ablate.mean_std([0.25]) == "25.0 ± 0.0"


def test_condition_study_lists_the_paper_ablations():
    names = set(ablate.CONDITIONS)
    assert {"without-reward", "without-stability", "without-margin", "only-reward", "only-stability",
            "only-margin", "constant-0.05", "constant-0.15", "constant-0.25", "linear", "cosine"} <= names
    assert ablate.CONDITIONS["only-margin"] == ["--schedule", "medloc", "--no-reward-check",
                                                "--no-stability-check"]


def test_report_from_finished_runs_without_training(tmp_path, monkeypatch):
    out = tmp_path / "results"
    fake_run(out / "runs" / "warmstart" / "derm-s0-w100", 0.4)
    for k, name in enumerate(ablate.CONDITIONS):
        fake_run(out / "runs" / "conditions-quick" / "derm-s0" / name, 0.5 + k / 100,
                 taus=[0.3, 0.3, 0.45, 0.45, 0.6, 0.6, 0.7, 0.8])
    import matplotlib.pyplot  # noqa: F401  its first import may run fc-list through subprocess
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was redone"))
    ablate.main(["--study", "conditions", "--quick", "--modality", "derm", "--out", str(out), "--warm-steps", "100"])
    rows = json.loads((out / "conditions-quick.json").read_text())
    assert len(rows) == len(ablate.CONDITIONS)
    first = rows[0]
    assert (first["modality"], first["method"], first["seed"]) == ("derm", "medloc", 0)
    assert first["A@0.5"] == 0.5 and first["final_tau"] == 0.8
    assert first["early_frac_equal_groups"] == 1.0  # first quarter = 2 of 8 steps, both all-equal
    table = (out / "conditions-quick.md").read_text()
    assert "| synth:derm | A@0.5 | 40.0 ± 0.0 | 50.0 ± 0.0 | 51.0 ± 0.0 |" in table
    for key in ("tau", "hit_rate", "frac_equal_groups"):
        assert (out / f"conditions-quick_{key}.png").stat().st_size > 1000
    lines = (out / "conditions-quick_curves.csv").read_text().splitlines()
    assert len(lines) == 1 + 8 * len(ablate.CONDITIONS)  # a header, then every step of every run
    assert lines[1].startswith("derm,") and ",3,0.45," in "".join(lines)  # step 3 of a run: tau 0.45


def test_the_warm_start_length_is_read_off_the_ceiling_curve():
    curve = [(250, {"mIoU": 0.1}), (500, {"mIoU": 0.3}), (750, {"mIoU": 0.5}), (1000, {"mIoU": 0.45})]
    # half of the best 0.5 is 0.25: 3/4 of the way from step 250 to 500 = 437.5, rounded up to 450
    assert ablate.warm_steps(curve, 0.5) == 450
    assert ablate.warm_steps(curve, 0.2) == 250  # 0.1: reached exactly at the first evaluation
    assert ablate.warm_steps(curve, 0.1) == 150  # 0.05: between step 0 (mIoU 0) and 250, 125 -> 150


def test_paired_differences_with_a_t_interval():
    mean, half = ablate.paired_ci([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])  # differences 10, 20, 20 points
    assert mean == pytest.approx(50 / 3)
    assert half == pytest.approx(4.303 * (100 / 3) ** 0.5 / 3 ** 0.5)


def test_the_ceiling_study_reports_the_best_point_and_the_warm_start_rule(tmp_path):
    out = tmp_path / "results"
    for m in ablate.MODALITIES:
        run = out / "runs" / "ceiling" / m
        fake_run(run, 0.8)  # final eval: mIoU 0.2
        with open(run / "metrics.jsonl", "w") as f:
            for step, miou in ((250, 0.1), (500, 0.4), (750, 0.3)):
                f.write(json.dumps({"step": step, **{f"eval_{k}": miou for k in ablate.METRICS}}) + "\n")
    ablate.main(["--study", "ceiling", "--out", str(out)])
    text = (out / "ceiling.md").read_text()
    # best mIoU 0.4 at step 500; 40 % of it (0.16) is reached 1/5 of the way from 250 to 500: 300
    assert "| synth:derm | 500 | 40.0 | 40.0 | 40.0 | 40.0 | 300 |" in text
    assert (out / "ceiling.png").stat().st_size > 1000


def test_vrft_rows_and_their_flags():
    assert ablate.vrft_rows("grade") == list(ablate.VRFT)
    assert "+MFRS" not in ablate.vrft_rows("type") and "all" in ablate.vrft_rows("type")
    assert ablate.vrft_flags("all", "type") == ["--knowledge", "--recite-weight", "-0.5"]
    assert ablate.vrft_flags("all", "grade") == ["--knowledge", "--mfrs-weight", "1", "--recite-weight", "-0.5"]
    assert ablate.VRFT["-recite"][-1] == "-0.5" and ablate.VRFT["+recite"][-1] == "0.5"


def test_vrft_rows_start_from_the_warm_start_of_their_prompt_and_grounding_stage(tmp_path, monkeypatch):
    runs = {}
    monkeypatch.setattr(ablate, "run_train", lambda flags, run_dir, log: runs.setdefault(run_dir, flags) and 0.0)
    args = ablate.parse_args(["--study", "vrft", "--quick", "--jobs", "1", "--out", str(tmp_path)])
    ablate.run_vrft(args)
    root = str(tmp_path / "runs" / "vrft-quick")

    def init(run_dir):
        flags = runs[os.path.join(root, run_dir)]
        return flags[flags.index("--init") + 1][len(root) + 1:] if "--init" in flags else None
    assert init("grade-s0/+PA_pi") == "warmstart/grade-s0-perception/final"
    assert init("grade-s0/+ground-sft") == "warmstart/grade-s0-ground-sft/final"
    assert init("type-s0/all") == "warmstart/type-s0-perception-knowledge/final"
    assert init("type-s0/-recite") == "warmstart/type-s0-knowledge/final"
    assert init("grade-s0/rft") == "warmstart/grade-s0/final"
    assert init("warmstart/grade-s0-perception") == "grounding-s0/final"
    assert init("warmstart/grade-s0-ground-sft") == "grounding-s0/warmstart/model"  # before its GRPO
    assert init("warmstart/grade-s0") is None and init("grounding-s0") is None
    assert "--knowledge" in runs[os.path.join(root, "warmstart", "type-s0-knowledge")]


def test_vrft_report_from_finished_runs(tmp_path):
    out = tmp_path / "results"
    root = out / "runs" / "vrft-quick"
    for kind in ablate.VRFT_SETS:
        for seed in (0, 1):
            for k, name in enumerate(ablate.vrft_rows(kind)):
                run = root / f"{kind}-s{seed}" / name
                os.makedirs(run)
                # seed 1 is 2 points better everywhere, "+PA_p" 4 points better than rft on seed 1 only
                accuracy = 0.5 + k / 100 + 0.02 * seed + (0.04 * seed if name == "+PA_p" else 0)
                metrics = {"accuracy": accuracy, "macro_f1": 0.4, "n": 10}
                if kind == "grade":
                    metrics.update(qwk=0.6, mae=0.75)
                (run / "eval.json").write_text(json.dumps(metrics))
                steps = [{"step": i, "acc_mean": accuracy, "recite_mean": 0.1 * seed} for i in range(1, 4)]
                start = ablate.warm_dir(str(root), (kind, seed), ablate.PERCEPTION_FIRST.get(name),
                                        "--knowledge" in ablate.VRFT[name])
                os.makedirs(start, exist_ok=True)  # warm starts at 30 % plus 10 points from a grounding model
                (Path(start) / "eval.json").write_text(json.dumps({"accuracy": 0.3 + 0.1 * (name in ablate.PERCEPTION_FIRST)}))
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    ablate.report_vrft(argparse.Namespace(quick=True, out=str(out)), str(root),
                       [(k, s) for k in ablate.VRFT_SETS for s in (0, 1)], 60.0)
    table = (out / "vrft-quick.md").read_text()
    assert "| rft | 52.0 ± 1.0 | 40.0 ± 0.0 | 60.0 ± 0.0 | 0.8 ± 0.0 | 30.0 ± 0.0 | 52.0 ± 1.0 | 40.0 ± 0.0 | 30.0 ± 0.0 |" in table
    assert "| +MFRS | 56.0 ± 1.0 | 40.0 ± 0.0 | 60.0 ± 0.0 | 0.8 ± 0.0 | 30.0 ± 0.0 | - | - | - |" in table
    assert "| all | 59.0 ± 1.0 | 40.0 ± 0.0 | 60.0 ± 0.0 | 0.8 ± 0.0 | 40.0 ± 0.0 | 58.0 ± 1.0 | 40.0 ± 0.0 | 40.0 ± 0.0 |" in table
    assert "| grade mae | grade warm-start accuracy | type accuracy |" in table
    # paired differences: +PA_p is 1 then 5 points above rft: mean 3, half-width 12.706 * sd(1, 5) / sqrt 2
    half = 12.706 * 2 ** 0.5 * 2 / 2 ** 0.5
    assert f"| +PA_p − rft | knowledge in the prompt | +3.0 ± {half:.1f} | +0.0 ± 0.0 | +3.0 ± {half:.1f} |" in table
    assert "| +MFRS − rft | the fuzzy grade reward | +4.0 ± 0.0 | +0.0 ± 0.0 | - |" in table
    # -recite is 5 then 1 points above +PA_p on grade (row 7 vs 2), 4 then 0 on type (no +MFRS row there)
    assert f"| -recite − +PA_p | penalising recitation | +3.0 ± {half:.1f} | +0.0 ± 0.0 | +2.0 ± {half:.1f} |" in table
    for plot in ("vrft-quick.png", "vrft-quick_acc_mean.png", "vrft-quick_recite_mean.png"):
        assert (out / plot).stat().st_size > 1000


def test_a_study_size_below_one_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--seeds", "0"])
    assert "--seeds 0: must be at least 1" in capsys.readouterr().err
