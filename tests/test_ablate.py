"""ablate.py's bookkeeping: finished runs are not redone, and the tables average the right runs."""
import json
import os

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
    fake_run(out / "runs" / "warmstart-quick" / "derm-s0", 0.4)
    for k, name in enumerate(ablate.CONDITIONS):
        fake_run(out / "runs" / "conditions-quick" / "derm-s0" / name, 0.5 + k / 100,
                 taus=[0.3, 0.3, 0.45, 0.45, 0.6, 0.6, 0.7, 0.8])
    import matplotlib.pyplot  # noqa: F401  its first import may run fc-list through subprocess
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was redone"))
    ablate.main(["--study", "conditions", "--quick", "--modality", "derm", "--out", str(out)])
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
