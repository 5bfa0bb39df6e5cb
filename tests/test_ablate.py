"""ablate.py's bookkeeping: the studies' runs start where their protocol says, finished runs are
not redone, and the tables and paired differences average the right runs."""
import dataclasses
import json
import math
import os
import statistics

import pytest

import ablate


def fake_config(folder, algo="grpo"):
    """The config.json every train.py run writes: what the report reads of it."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"algo": algo, "batch_prompts": 4, "group_size": 8}, f)


def fake_run(folder, a05, taus=(), start=0.4):
    """A finished grounding run: eval.json from a05, its start's score, one log line per tau."""
    os.makedirs(os.path.join(folder, "warmstart"), exist_ok=True)
    fake_config(folder)
    for path, value in (("eval.json", a05), (os.path.join("warmstart", "eval.json"), start)):
        m = {"A@0.5": value, "A@0.8": value / 2, "mAP": value / 3, "mIoU": value / 4, "parse_fail": 0.0, "n": 10}
        with open(os.path.join(folder, path), "w") as f:
            json.dump(m, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, tau in enumerate(taus, 1):
            f.write(json.dumps({"step": step, "tau": tau, "hit_rate": 0.5, "tau_changed": step > 1 and tau != taus[step - 2],
                                "frac_equal_groups": 1.0 if step <= 2 else 0.0}) + "\n")


def test_mean_std_in_percent():
    assert ablate.mean_std([0.5, 0.7]) == "60.0 ± 10.0"
    assert ablate.mean_std([0.25]) == "25.0 ± 0.0"


def test_the_rule_study_is_the_paper_s_ablation():
    assert set(ablate.RULES) == {"medloc", "without-reward", "without-stability", "without-margin", "only-margin",
                                 "only-stability"}
    assert ablate.RULES["only-margin"] == ["--schedule", "medloc", "--no-reward-check", "--no-stability-check"]
    assert ablate.RULES["without-reward"] == ["--schedule", "medloc", "--no-reward-check"]


def test_compared_rows_start_from_the_same_model_and_run_the_same_steps(tmp_path):
    args = ablate.parse_args(["--study", "compare", "--steps", "120", "--init", "/w", "--out", str(tmp_path)])
    cells = [("derm", 0), ("derm", 1)]
    (stage,) = ablate.STUDIES["compare"].stages(args, "R", cells)
    assert len(stage) == 2 * len(ablate.COMPARE)
    for run_dir, flags in stage:
        assert flags[flags.index("--init") + 1] == "/w" and flags[flags.index("--steps") + 1] == "120"
        assert flags[flags.index("--seed") + 1] == run_dir.split("-s")[1][0]  # the seed of its folder
    sft = dict(stage)[os.path.join("R", "derm-s1", "sft")]
    assert sft[-2:] == ["--batch-prompts", "4"] and "--algo" in sft
    # without --init: one SFT warm start of --warm-steps first, every row from its final model
    args = ablate.parse_args(["--study", "compare", "--warm-steps", "700", "--out", str(tmp_path)])
    (warm, flags), = ablate.STUDIES["compare"].stages(args, "R", cells)[0]
    assert warm == os.path.join("R", "warmstart") and flags[flags.index("--steps") + 1] == "700"
    rows = ablate.STUDIES["compare"].stages(args, "R", cells)[1]
    assert {f[f.index("--init") + 1] for _, f in rows} == {os.path.join("R", "warmstart", "final")}


def test_report_from_finished_runs_without_training(tmp_path, monkeypatch):
    out = tmp_path / "results"
    argv = ["--study", "rules", "--quick", "--seeds", "2", "--init", "W", "--out", str(out)]
    ablate.main(argv + ["--print-commands", str(tmp_path / "runs.sh")])  # run elsewhere: each row's settings recorded
    for k, name in enumerate(ablate.RULES):
        for seed in (0, 1):  # seed 1 two points better on every row; row k one point above row k-1
            fake_run(out / "runs" / "rules-quick" / f"derm-s{seed}" / name, 0.5 + k / 100 + 0.02 * seed,
                     taus=[0.3, 0.3, 0.45, 0.45, 0.6, 0.6, 0.7, 0.8][:8 - k])
    import matplotlib.pyplot  # noqa: F401  its first import may run fc-list through subprocess
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was redone"))
    ablate.main(argv)
    rows = json.loads((out / "rules-quick.json").read_text())
    assert len(rows) == len(ablate.RULES)  # --quick: one seed
    first = rows[0]
    assert (first["set"], first["row"], first["seed"]) == ("derm", "medloc", 0)
    assert first["A@0.5"] == 0.5 and first["start_A@0.5"] == 0.4 and first["final_tau"] == 0.8
    assert first["raises"] == 4 and first["first_raise"] == 3
    assert first["early_frac_equal_groups"] == 1.0  # first quarter = 2 of 8 steps, both all-equal
    table = (out / "rules-quick.md").read_text()
    assert "| synth:derm | medloc | 50.0 ± 0.0 | 25.0 ± 0.0 | 16.7 ± 0.0 | 12.5 ± 0.0 | 40.0 ± 0.0 |" in table
    # without-reward (row 1) has 7 steps: tau 0.3 .. 0.7, three raises
    assert "| synth:derm | without-reward | 51.0 ± 0.0 |" in table
    assert "| 0.70 ± 0.00 | 3.0 ± 0.0 | 3.0 ± 0.0 |" in table
    assert "| synth:derm | medloc − without-reward | the full rule instead of without-reward | -0.5 ±" in table
    for key in ("tau", "hit_rate", "frac_equal_groups"):
        assert (out / f"rules-quick_{key}.png").stat().st_size > 1000
    lines = (out / "rules-quick_curves.csv").read_text().splitlines()
    assert len(lines) == 1 + sum(8 - k for k in range(len(ablate.RULES)))  # a header, then every step of every run
    assert lines[1].startswith("derm,") and ",3,0.45," in "".join(lines)  # step 3 of a run: tau 0.45


def test_paired_differences_with_a_t_interval():
    mean, half = ablate.paired_ci([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])  # differences 10, 20, 20 points
    assert mean == pytest.approx(50 / 3)
    assert half == pytest.approx(4.303 * (100 / 3) ** 0.5 / 3 ** 0.5)


def test_vrft_rows_and_their_flags():
    assert ablate.vrft_rows("grade") == list(ablate.VRFT)
    assert "+MFRS" not in ablate.vrft_rows("type") and "all" in ablate.vrft_rows("type")
    assert ablate.vrft_flags("all", "type") == ["--knowledge", "--recite-weight", "-0.5"]
    assert ablate.vrft_flags("all", "grade") == ["--knowledge", "--mfrs-weight", "1", "--recite-weight", "-0.5"]
    assert ablate.VRFT["-recite"][-1] == "-0.5" and ablate.VRFT["+recite"][-1] == "0.5"


def test_vrft_rows_start_from_the_warm_start_of_their_prompt_and_grounding_stage(tmp_path):
    args = ablate.parse_args(["--study", "vrft", "--quick", "--out", str(tmp_path)])
    grounding, warm, rows = ablate.vrft_stages(args, "R", [(k, 0) for k in ablate.VRFT_SETS])
    runs = dict(grounding + warm + rows)
    assert len(runs) == len(grounding) + len(warm) + len(rows)  # no run is listed twice

    def init(run_dir):
        flags = runs[os.path.join("R", run_dir)]
        return flags[flags.index("--init") + 1][2:] if "--init" in flags else None
    assert init("grade-s0/+PA_pi") == "warmstart/grade-s0-perception/final"
    assert init("grade-s0/+ground-sft") == "warmstart/grade-s0-ground-sft/final"
    assert init("type-s0/all") == "warmstart/type-s0-perception-knowledge/final"
    assert init("type-s0/-recite") == "warmstart/type-s0-knowledge/final"
    assert init("grade-s0/rft") == "warmstart/grade-s0/final"
    assert init("warmstart/grade-s0-perception") == "grounding-s0/final"
    assert init("warmstart/grade-s0-ground-sft") == "grounding-s0/warmstart/model"  # before its GRPO
    assert init("warmstart/grade-s0") is None and init("grounding-s0") is None
    assert "--knowledge" in runs[os.path.join("R", "warmstart", "type-s0-knowledge")]
    assert "+MFRS" not in {r.split(os.sep)[-1] for r, _ in rows if "type-s0" in r}


def test_vrft_report_pairs_the_rows_by_seed(tmp_path):
    out = tmp_path / "results"
    root = out / "runs" / "vrft"
    for kind in ablate.VRFT_SETS:
        for seed in (0, 1):
            for k, name in enumerate(ablate.vrft_rows(kind)):
                run = root / f"{kind}-s{seed}" / name
                os.makedirs(run / "warmstart")
                fake_config(run)
                # seed 1 is 2 points better everywhere, "+PA_p" 4 points better than rft on seed 1 only
                accuracy = 0.5 + k / 100 + 0.02 * seed + (0.04 * seed if name == "+PA_p" else 0)
                metrics = {"accuracy": accuracy, "macro_f1": 0.4, "n": 10}
                if kind == "grade":
                    metrics.update(qwk=0.6, mae=0.75)
                (run / "eval.json").write_text(json.dumps(metrics))
                (run / "warmstart" / "eval.json").write_text(json.dumps({"accuracy": 0.3}))
                steps = [{"step": i, "acc_mean": accuracy, "recite_mean": 0.1 * seed} for i in range(1, 4)]
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    cells = [(k, s) for k in ablate.VRFT_SETS for s in (0, 1)]
    ablate.report(ablate.STUDIES["vrft"], "vrft", str(root), cells, str(out), 60.0)
    table = (out / "vrft.md").read_text()
    assert "| synth:grade | rft | 52.0 ± 1.0 | 40.0 ± 0.0 | 60.0 ± 0.0 | 0.75 ± 0.00 | 30.0 ± 0.0 |" in table
    assert "| synth:type | rft | 52.0 ± 1.0 | 40.0 ± 0.0 | - | - | 30.0 ± 0.0 |" in table
    assert "| synth:type | +MFRS |" not in table  # not an ordinal set
    # paired differences: +PA_p is 1 then 5 points above rft: mean 3, half-width 12.706 * sd(1, 5) / sqrt 2
    half = 12.706 * 2 ** 0.5 * 2 / 2 ** 0.5
    assert f"| synth:grade | +PA_p − rft | knowledge in the prompt | +3.0 ± {half:.1f} | +0.0 ± 0.0 |" in table
    assert "| synth:grade | +MFRS − rft | the fuzzy grade reward | +4.0 ± 0.0 | +0.0 ± 0.0 |" in table
    # -recite is 5 then 1 points above +PA_p on grade (row 7 vs 2), 4 then 0 on type (no +MFRS row there)
    assert f"| synth:type | -recite − +PA_p | penalising recitation | +2.0 ± {half:.1f} | - |" in table
    for plot in ("vrft_acc_mean.png", "vrft_recite_mean.png"):
        assert (out / plot).stat().st_size > 1000


def test_a_study_size_below_one_or_a_file_as_out_is_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        ablate.main(["--seeds", "0"])
    assert "--seeds 0: must be at least 1" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path / "f")])
    assert "a file, not a folder" in capsys.readouterr().err


def test_a_failed_run_says_why_with_the_last_lines_of_its_own_log(tmp_path):
    why = ablate.run_train(["--steps", "0"], str(tmp_path / "r"))
    assert why.startswith(f"exit status 1; {tmp_path / 'r'}.log ends: ") and "--steps 0: must be >= 1" in why


def test_the_loose_study_starts_from_loosened_sft_and_reports_box_areas(tmp_path):
    args = ablate.parse_args(["--study", "loose", "--out", str(tmp_path)])
    cells = [("derm", 0), ("us", 0)]
    (warm, flags), = ablate.STUDIES["loose"].stages(args, "R", cells)[0]
    assert flags[flags.index("--sft-box-scale") + 1] == ablate.LOOSE_SCALE
    assert flags[flags.index("--init") + 1] == ablate.TINY_WARM_START and os.path.isdir(ablate.TINY_WARM_START)
    assert flags[flags.index("--steps") + 1] == str(ablate.LOOSE_WARM_STEPS) and flags[flags.index("--algo") + 1] == "sft"
    rows = ablate.STUDIES["loose"].stages(args, "R", cells)[1]
    assert len(rows) == 2 * len(ablate.LOOSE) and all("--sft-box-scale" not in f for _, f in rows)  # rows: the true boxes
    margin = dict(rows)[os.path.join("R", "us-s0", "without-margin")]
    assert margin[-3:] == ["--schedule", "medloc", "--no-margin-check"]
    out = tmp_path / "results"
    for seed in (0, 1):
        for k, row in enumerate(ablate.LOOSE):
            folder = out / "runs" / "loose-quick" / f"derm-s{seed}" / row
            fake_run(folder, 0.6 + k / 100, taus=[0.3, 0.45])
            for path, area in (("eval.json", 1.2 + k / 10), ("warmstart/eval.json", 1.6)):
                m = json.loads((folder / path).read_text())
                (folder / path).write_text(json.dumps({**m, "box_area_ratio": area}))
            with open(folder / "metrics.jsonl", "a") as f:  # a step where nothing parsed: no area
                f.write(json.dumps({"step": 3, "tau": 0.45, "box_area_ratio": None}) + "\n")
    records = ablate.report(ablate.STUDIES["loose"], "loose-quick", str(out / "runs" / "loose-quick"),
                            [("derm", 0), ("derm", 1)], str(out), 60.0)  # synth:us's cells: none yet
    medloc = next(r for r in records if r["row"] == "medloc")
    assert medloc["box_area_ratio"] == pytest.approx(1.6) and medloc["start_box_area_ratio"] == 1.6
    table = (out / "loose-quick.md").read_text()
    assert "| synth:derm | medloc | 64.0 ± 0.0 | 32.0 ± 0.0 | 21.3 ± 0.0 | 16.0 ± 0.0 | 1.60 ± 0.00 | 40.0 ± 0.0 |" in table
    assert "| 10.0 ± 0.0 | 1.60 ± 0.00 | 0.45 ± 0.00 |" in table  # the start's area ratio, as a ratio
    assert "| synth:us | medloc | - |" in table
    assert (out / "loose-quick_box_area_ratio.png").stat().st_size > 1000


class FakeTrain:
    """subprocess.run for ablate's runs: records each command, its GPUs and its overlap with the
    others, and leaves a finished run folder (eval.json, its start's, a log) where the run would."""

    def __init__(self, fail=()):
        import threading
        self.calls, self.lock, self.running, self.most, self.fail = [], threading.Lock(), 0, 0, fail

    def __call__(self, cmd, **kw):
        import subprocess
        import time
        out = cmd[cmd.index("--out") + 1]
        with self.lock:
            self.calls.append((cmd, kw["env"].get("CUDA_VISIBLE_DEVICES")))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        if not any(f in out for f in self.fail):
            fake_run(out, 0.5, taus=[0.3, 0.45])
        kw["stdout"].write("training\nTraceback: boom\n" if any(f in out for f in self.fail) else "ok\n")
        with self.lock:
            self.running -= 1
        return subprocess.CompletedProcess(cmd, 1 if any(f in out for f in self.fail) else 0)


def test_rows_queue_over_the_gpus_each_seeing_only_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "cuda_devices", lambda: 4)
    fake = FakeTrain()
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    ablate.main(["--study", "compare", "--quick", "--seeds", "2", "--gpus", "0,1,2", "--out", str(tmp_path)])
    warm, *rows = fake.calls
    assert warm[0][warm[0].index("--out") + 1].endswith("warmstart")  # the warm start before the rows that need it
    assert len(rows) == 2 * len(ablate.COMPARE) and {gpu for _, gpu in rows} == {"0", "1", "2"}  # --quick: one seed
    assert fake.most == 3  # a GPU takes the next row when it frees: three at a time, never more
    fake = FakeTrain()
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    ablate.main(["--study", "compare", "--quick", "--seeds", "1", "--rows", "medloc,fixed", "--gpus", "0,1,2,3",
                 "--gpus-per-row", "2", "--out", str(tmp_path / "k2"), "--", "--fsdp"])
    for cmd, gpus in fake.calls:
        assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        assert gpus in ("0,1", "2,3") and cmd[-3:-2] == ["--fsdp"]  # the extra flags, on every run
    assert sorted(os.path.basename(c[c.index("--out") + 1]) for c, _ in fake.calls) == \
        ["fixed", "fixed", "medloc", "medloc", "warmstart"]
    assert "Extra train.py flags of every run: `--fsdp`" in (tmp_path / "k2" / "compare-quick.md").read_text()


def test_printed_commands_are_the_runs_the_study_starts_and_report_rebuilds_its_table(tmp_path, monkeypatch):
    argv = ["--study", "compare", "--quick", "--seeds", "2", "--jobs", "1", "--out", str(tmp_path)]
    ablate.main(argv + ["--print-commands", str(tmp_path / "runs.sh")])
    assert not (tmp_path / "runs" / "compare-quick" / "warmstart").exists()  # nothing ran
    fake = FakeTrain()
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    ablate.main(argv)
    import shlex
    printed = [shlex.split(line.split(" && ", 1)[1]) for line in (tmp_path / "runs.sh").read_text().splitlines()]
    assert printed == [cmd for cmd, _ in fake.calls]  # the same flags, in the same order
    table = (tmp_path / "compare-quick.md").read_text()
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("--report ran something"))
    ablate.main(argv + ["--report"])
    strip = lambda text: [line for line in text.splitlines() if "wall time" not in line]
    assert strip((tmp_path / "compare-quick.md").read_text()) == strip(table)


def test_a_failed_row_is_reported_the_others_finish_and_its_cells_are_missing(tmp_path, monkeypatch):
    fake = FakeTrain(fail=[os.path.join("us-s0", "fixed")])
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed .*us-s0/fixed: exit status 1; .*fixed.log ends: training \| Traceback: boom"):
        ablate.main(["--study", "compare", "--quick", "--seeds", "2", "--out", str(tmp_path)])
    assert len(fake.calls) == 1 + 2 * len(ablate.COMPARE)  # every other run went on (--quick: one seed)
    table = (tmp_path / "compare-quick.md").read_text()
    assert "Missing (1 runs" in table and "us-s0/fixed: exit status 1" in table
    assert "| synth:us | fixed | - |" in table and "| synth:derm | medloc | 50.0 ± 0.0 |" in table
    fake = FakeTrain()  # the same command again: only the missing run
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    ablate.main(["--study", "compare", "--quick", "--seeds", "2", "--out", str(tmp_path)])
    assert [c[c.index("--out") + 1] for c, _ in fake.calls] == [str(tmp_path / "runs" / "compare-quick" / "us-s0" / "fixed")]


def test_report_to_reaches_every_run_in_the_study_s_group_and_a_resumed_run_keeps_how_it_launches(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    ablate.main(["--study", "compare", "--quick", "--seeds", "1", "--rows", "medloc", "--report-to", "tensorboard,wandb",
                 "--out", str(tmp_path)])
    assert len(fake.calls) == 3  # the warm start, medloc on derm and on us
    for cmd, _ in fake.calls:
        assert cmd[cmd.index("--report-to") + 1] == "tensorboard,wandb" and cmd[cmd.index("--run-group") + 1] == "compare-quick"
    run_dir = tmp_path / "stopped"
    os.makedirs(run_dir / "checkpoint-000002")  # a resumed run: its config.json holds what it computes
    flags = ["--dataset", "synth:us", "--steps", "9", "--report-to", "wandb", "--lr", "1e-3", "--run-group", "g", "--fsdp",
             "--stages", "0:0.5,0.5:0.8"]
    assert ablate.command(flags, str(run_dir))[2:] == ["--resume", str(run_dir), "--steps", "9", "--report-to", "wandb",
                                                       "--run-group", "g", "--fsdp"]


def test_a_failed_warm_start_leaves_its_rows_unrun(tmp_path, monkeypatch):
    fake = FakeTrain(fail=["warmstart"])
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    with pytest.raises(SystemExit, match="not run: its start .*warmstart failed"):
        ablate.main(["--study", "compare", "--quick", "--seeds", "1", "--out", str(tmp_path)])
    assert len(fake.calls) == 1


def test_study_flags_for_any_data_are_checked_in_one_line(tmp_path, capsys):
    for argv, message in ((["--dataset", "x.jsonl"], "--dataset and --eval-dataset go together"),
                          (["--study", "vrft", "--dataset", "a", "--eval-dataset", "b"], "runs on its built-in sets"),
                          (["--dataset", str(tmp_path / "no.jsonl"), "--eval-dataset", "b"], "no such file"),
                          (["--rows", "medloc,ppo"], "ppo not in the compare study"),
                          (["--gpus", "0,1", "--gpus-per-row", "3"], "between 1 and the 2 GPU(s)"),
                          (["--report-to", "mlflow"], "--report-to 'mlflow': none, or one or more of tensorboard, wandb"),
                          (["--rows", ","], "--rows ',': names no row"),
                          (["--gpus", "a,b"], "--gpus a,b: comma-separated GPU ids (0, 1, ...), not a, b"),
                          (["--gpus", "0,0"], "GPU 0 named twice"),
                          (["--gpus-per-row", "2"], "--gpus-per-row 2: goes with --gpus"),
                          (["--print-commands", str(tmp_path)], "a folder; give the file to write the commands into"),
                          (["--print-commands", str(tmp_path / "no" / "runs.sh")], "is not a folder")):
        with pytest.raises(SystemExit):
            ablate.main(argv + ["--out", str(tmp_path)])
        assert message in capsys.readouterr().err
    if ablate.cuda_devices() < 8:  # a GPU this machine does not have
        with pytest.raises(SystemExit):
            ablate.main(["--gpus", "7", "--out", str(tmp_path)])
        assert f"this machine has {ablate.cuda_devices()} CUDA device(s); no GPU 7" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was written


def test_flags_after_the_separator_may_not_replace_the_study_s_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    for extra, study_flag in ((["--steps", "3"], "--steps"), (["--seed=4"], "--seeds"), (["--out", "x"], "--out"),
                              (["--dataset", "d.jsonl"], "--dataset"), (["--schedule", "fixed"], "what the rows compare"),
                              (["--sav", "3"], "--save-every")):  # an abbreviation is the flag it abbreviates
        name = {"--sav": "--save-every"}.get(extra[0].split("=")[0], extra[0].split("=")[0])
        with pytest.raises(SystemExit, match=f"-- {name}: the study sets it for every run .*{study_flag}"):
            ablate.main(["--study", "compare", "--quick", "--init", "W", "--out", str(tmp_path), "--"] + extra)


def test_two_studies_on_one_folder_the_second_refused_and_other_settings_never_reused(tmp_path, monkeypatch, capsys):
    import files
    root = tmp_path / "runs" / "compare-quick"
    os.makedirs(root)
    argv = ["--study", "compare", "--quick", "--rows", "medloc", "--init", "W", "--out", str(tmp_path)]
    with files.Lock(str(root), "ablate.py"):  # another ablate.py holds the study
        with pytest.raises(SystemExit, match=f"{root} is in use by another ablate.py"):
            ablate.main(argv)
    monkeypatch.setattr(ablate.subprocess, "run", FakeTrain())
    ablate.main(argv)  # the rows finish
    fake = FakeTrain()
    monkeypatch.setattr(ablate.subprocess, "run", fake)
    with pytest.raises(SystemExit, match="derm-s0/medloc was started with other settings .*--steps 83.*--steps 9"):
        ablate.main(argv[:-2] + ["--steps", "27", "--out", str(tmp_path)])  # --quick: a third of --steps
    assert fake.calls == []  # neither reused nor deleted
    with pytest.raises(SystemExit, match="--report: no rules-quick study in"):
        ablate.main(["--study", "rules", "--quick", "--report", "--out", str(tmp_path / "data")])
    assert not (tmp_path / "data").exists()


def test_a_row_still_training_is_not_deleted_and_a_damaged_eval_is_named(tmp_path, monkeypatch):
    import files
    run = tmp_path / "row"
    ablate.record_settings(["--steps", "3"], str(run))
    os.makedirs(run)
    (run / "metrics.jsonl").write_text("{}\n")
    with files.Lock(str(run)):  # its train.py has written no checkpoint yet
        assert "is in use by another train.py" in ablate.run_train(["--steps", "3"], str(run))
    assert (run / "metrics.jsonl").exists()
    (run / "eval.json").write_text('{"A@0.5": 0.')
    assert ablate.run_train(["--steps", "3"], str(run)).startswith(f"{run / 'eval.json'}: damaged")
    (run / "eval.json").write_text("[]")
    assert "not a JSON object of metrics" in ablate.run_train(["--steps", "3"], str(run))


def prepared_images(tmp_path, n=16):
    """synth:derm images as a COCO file would hold them, through prepare.py: the JSONL a user would have."""
    import prepare
    from synth import synth_sample
    os.makedirs(tmp_path / "coco")
    images, annotations = [], []
    for i in range(n):
        image, _, (x1, y1, x2, y2) = synth_sample("derm", "test", i)
        image.save(tmp_path / "coco" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations.append({"image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    with open(tmp_path / "coco.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "skin lesion"}]}, f)
    prepare.main(["coco", str(tmp_path / "coco.json"), "--images", str(tmp_path / "coco"), "--out", str(tmp_path / "data"),
                  "--split", "0.5,0,0.5", "--quiet"])
    return str(tmp_path / "data" / "train.jsonl"), str(tmp_path / "data" / "test.jsonl")


def test_a_study_on_prepared_data_resumes_a_killed_row_exactly_and_tables_every_row(tmp_path):
    import shlex
    import signal
    import subprocess
    import time
    train, test = prepared_images(tmp_path)
    out = tmp_path / "study"
    argv = ["--study", "compare", "--rows", "medloc,fixed", "--seeds", "2", "--steps", "6", "--save-every", "2",
            "--eval-n", "8", "--init", ablate.TINY_WARM_START, "--dataset", train, "--eval-dataset", test,
            "--out", str(out)]
    ablate.main(argv + ["--print-commands", str(tmp_path / "runs.sh")])
    line = next(c for c in (tmp_path / "runs.sh").read_text().splitlines() if "data-s1/fixed" in c)
    killed = out / "runs" / "compare" / "data-s1" / "fixed"
    proc = subprocess.Popen(line, shell=True, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoint-000002").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, after its first checkpoint
    proc.wait()
    assert (killed / "checkpoint-000002").exists() and not (killed / "eval.json").exists()
    cmd = shlex.split(line.split(" && ", 1)[1])
    cmd[cmd.index("--out") + 1] = str(tmp_path / "uninterrupted")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ablate.HERE)
    records = ablate.main(argv)  # three rows from the start, the killed one from its checkpoint
    assert f"resumed {killed} at step 2" in (out / "runs" / "compare" / "data-s1" / "fixed.log").read_text()
    for name in ("final/model.safetensors", "metrics.jsonl"):
        resumed, straight = (killed / name).read_bytes(), (tmp_path / "uninterrupted" / name).read_bytes()
        if name == "metrics.jsonl":  # the wall-clock fields differ; every other number is the same
            strip = lambda b: [{k: v for k, v in json.loads(l).items() if "seconds" not in k} for l in b.splitlines()]
            resumed, straight = strip(resumed), strip(straight)
        assert resumed == straight
    assert sorted((r["row"], r["seed"]) for r in records) == [("fixed", 0), ("fixed", 1), ("medloc", 0), ("medloc", 1)]
    table = (out / "compare.md").read_text()
    assert f"Data {train} (scored on {test})" in table and "Missing" not in table
    assert any(line.startswith("| ") and "medloc − fixed" in line and "±" in line for line in table.splitlines())


def test_the_sparsity_study_starts_very_loose_and_compares_rows_at_equal_completions(tmp_path):
    args = ablate.parse_args(["--study", "sparsity", "--out", str(tmp_path)])
    (warm, flags), = ablate.STUDIES["sparsity"].stages(args, "R", [("derm", 0)])[0]
    assert flags[flags.index("--sft-box-scale") + 1] == "1.7,1.9" and flags[flags.index("--lr") + 1] == "3e-4"
    rows = dict(ablate.STUDIES["sparsity"].stages(args, "R", [("derm", 0)])[1])
    with pytest.raises(SystemExit):  # a scale train.py would refuse, refused before any run
        ablate.parse_args(["--study", "sparsity", "--loose-scale", "1.9,x", "--out", str(tmp_path)])
    assert rows[os.path.join("R", "derm-s0", "dapo")][-8:] == ["--schedule", "fixed", "--tau", "0.5", "--recipe", "dapo",
                                                               "--eval-every", "10"]
    # fixed samples B x G = 32 a step for 4 steps (budget 128); dapo 64, 32, 64, 32 (totals 64, 96, 160, 192)
    # and is scored at steps 1, 2 and 3: its last score within 128 completions is step 2's.
    # medloc+ds samples 160 at its first step: within the budget only its start, step 0.
    out, root = tmp_path / "results", tmp_path / "results" / "runs" / "sparsity"
    per_step = {"sft": [None] * 4, "fixed": [None] * 4, "dapo": [64, 32, 64, 32], "medloc+ds": [160, 32, 32, 32]}
    scored = {"dapo": {1: 0.3, 2: 0.4, 3: 0.9}, "medloc+ds": {2: 0.8}}
    for seed in (0, 1):
        for row, sampled in per_step.items():
            folder = root / f"derm-s{seed}" / row
            fake_run(folder, 0.7 + 0.02 * seed, start=0.2)
            if row == "sft":
                fake_config(folder, "sft")
            log = []
            for step, n in enumerate(sampled, 1):
                r = {"step": step, "frac_equal_groups": 0.5, "entropy": 0.1 * step}
                if n is not None:
                    r["completions_sampled"] = n
                if step in scored.get(row, {}):
                    r.update({f"eval_{k}": scored[row][step] + 0.02 * seed for k in ablate.GROUNDING})
                log.append(r)
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    study = dataclasses.replace(ablate.STUDIES["sparsity"], rows={r: [] for r in per_step})
    records = ablate.report(study, "sparsity", str(root), [("derm", 0), ("derm", 1)], str(out), 60.0)
    got = {(r["row"], r["seed"]): r for r in records}
    assert got[("dapo", 1)]["budget_A@0.5"] == pytest.approx(0.42) and got[("dapo", 1)]["budget_step"] == 2
    assert got[("medloc+ds", 0)]["budget_A@0.5"] == 0.2 and got[("medloc+ds", 0)]["budget_step"] == 0
    assert got[("fixed", 0)]["budget_A@0.5"] == 0.7 and got[("fixed", 0)]["completions"] == 128
    assert got[("sft", 0)]["completions"] == 0 and got[("sft", 0)]["budget_step"] == 4
    assert got[("dapo", 0)]["late_entropy"] == pytest.approx(0.4) and got[("dapo", 0)]["completions"] == 192
    md = (out / "sparsity.md").read_text()
    assert "## At equal completions sampled (128)" in md
    assert "| synth:derm | dapo | 41.0 ± 1.0 | 41.0 ± 1.0 | 41.0 ± 1.0 | 41.0 ± 1.0 | 2.0 ± 0.0 | 0.2 ± 0.0 |" in md
    # at equal steps dapo equals fixed; at the budget it is 30 points below on A@0.5 on every seed
    assert "| synth:derm | dapo − fixed | DAPO instead of fixed | +0.0 ± 0.0 | +0.0 ± 0.0 |" in md
    assert "| synth:derm | dapo − fixed | DAPO instead of fixed | -30.0 ± 0.0 |" in md  # A@0.5
    assert (out / "sparsity_entropy_by_completions.png").stat().st_size > 1000


def test_the_scaling_study_s_rows_starts_and_order():
    """Each of raw-iou, medloc and fixed with and without the group std from two warm starts (the
    sparsity study's and the loose study's), stages and low stages on the sparse one; the rows run
    seed by seed, so a study stopped part-way has whole seeds."""
    study = ablate.STUDIES["scaling"]
    assert study.rows["sparse-raw-iou-none"] == ["--schedule", "raw-iou", "--adv-scale", "none"]
    assert study.rows["loose-fixed-group"] == ["--schedule", "fixed", "--tau", "0.5"]
    assert study.rows["sparse-low-stages-group"] == ["--schedule", "stages", "--stages", "0:0.3,0.3333:0.55,0.6667:0.8"]
    assert len(study.rows) == 14 and not any(r.startswith("loose-") and "stages" in r for r in study.rows)
    args = ablate.parse_args(["--study", "scaling", "--seeds", "2"])
    cells = [(k, s) for k in study.sets for s in range(2)]
    warm, runs = ablate.planned(study, args, "/r", "scaling", cells)
    assert [(d, f[f.index("--sft-box-scale") + 1]) for d, f in warm] == [("/r/warmstart-sparse", "1.7,1.9"),
                                                                          ("/r/warmstart-loose", "1.15,1.35")]
    assert [d.split("/")[2] for d, _ in runs] == ["derm-s0"] * 14 + ["us-s0"] * 14 + ["derm-s1"] * 14 + ["us-s1"] * 14
    for d, f in runs:
        assert f[f.index("--init") + 1] == f"/r/warmstart-{d.split('/')[3].split('-')[0]}/final"


def test_the_interaction_is_the_paired_difference_of_two_contrasts_with_its_t_interval(tmp_path):
    """Hand-built runs: A@0.8 of each row by seed; the interaction (a - b) - (c - d) by seed is
    [0.2, 0.1, 0.3] (in points: 20, 10, 30), so mean 20 and half-width t(2) * sd / sqrt(3)."""
    rows = {"sparse-medloc-none": [0.5, 0.4, 0.6], "sparse-raw-iou-none": [0.2, 0.2, 0.2],
            "sparse-medloc-group": [0.3, 0.3, 0.3], "sparse-raw-iou-group": [0.2, 0.2, 0.2]}
    study = dataclasses.replace(ablate.STUDIES["scaling"], sets=("derm",), rows=dict.fromkeys(rows, []),
                                interactions=(("sparse-medloc-none", "sparse-raw-iou-none", "sparse-medloc-group",
                                               "sparse-raw-iou-group", "H1"),), contrasts=())
    root = tmp_path / "runs"
    for row, values in rows.items():
        for seed, v in enumerate(values):
            folder = root / f"derm-s{seed}" / row
            fake_run(str(folder), 2 * v, taus=(0.3,) * 3)  # fake_run's A@0.8 is half its A@0.5
            with open(folder / "metrics.jsonl", "w") as f:
                for step in (1, 2, 3):
                    f.write(json.dumps({"step": step, "tau": 0.3, "group_reward_std": 0.1 * step * (seed + 1),
                                        "parse_fail": 0.25}) + "\n")
    records = ablate.report(dataclasses.replace(study, early=2), "scaling", str(root), [("derm", s) for s in range(3)],
                            str(tmp_path), 60.0)
    md = (tmp_path / "scaling.md").read_text()
    half = 4.303 * statistics.stdev([20, 10, 30]) / math.sqrt(3)
    assert f"| synth:derm | (sparse-medloc-none − sparse-raw-iou-none) − (sparse-medloc-group − sparse-raw-iou-group) | H1 | " \
           f"+20.0 ± {half:.1f} (3/3 > 0) |" in md
    first = next(r for r in records if r["row"] == "sparse-medloc-none" and r["seed"] == 1)
    assert first["early_group_reward_std"] == pytest.approx((0.2 + 0.4) / 2) and first["parse_fail"] == 0.25


@pytest.mark.parametrize("study", ["compare", "multi", "scaling", "vrft"])
def test_loose_scale_where_a_study_would_ignore_it_is_refused_in_one_line(study, capsys):
    with pytest.raises(SystemExit):
        ablate.parse_args(["--study", study, "--loose-scale", "1.2,1.4"])
    assert capsys.readouterr().err.endswith(f"error: --loose-scale 1.2,1.4: only the loose and sparsity studies start "
                                            f"from loosened boxes (the {study} study would ignore it)\n")


def scaling_records(gains_none, gains_group):
    """scaling.json records of the sparse start's four rows: per seed, medloc-none minus raw-iou-none
    is gains_none[s] and medloc-group minus raw-iou-group gains_group[s] (A@0.8), on both sets."""
    out = []
    for kind in ("derm", "us"):
        for seed, (gn, gg) in enumerate(zip(gains_none, gains_group)):
            for row, value in (("medloc-none", 0.3 + gn), ("raw-iou-none", 0.3), ("medloc-group", 0.3 + gg),
                               ("raw-iou-group", 0.3)):
                out.append({"set": kind, "seed": seed, "row": f"sparse-{row}", "A@0.8": value})
    return out


def test_the_headline_takes_its_scale_from_the_scaling_study_by_its_protocols_rule(tmp_path):
    (tmp_path / "scaling.json").write_text(json.dumps(scaling_records([0.2, 0.25, 0.3, 0.22, 0.28], [0.0] * 5)))
    assert ablate.headline_scale(str(tmp_path)) == "none"  # H1 holds on both sets
    (tmp_path / "scaling.json").write_text(json.dumps(scaling_records([0.2, -0.25, 0.3, -0.22, 0.28], [0.0] * 5)))
    assert ablate.headline_scale(str(tmp_path)) == "group"  # an interval that covers 0
    (tmp_path / "scaling.json").write_text(json.dumps(scaling_records([0.2] * 4, [0.0] * 4)))
    with pytest.raises(SystemExit, match="not finished on all 5 seeds"):
        ablate.headline_scale(str(tmp_path))
    (tmp_path / "scaling.json").write_text(json.dumps(scaling_records([0.2, 0.25, 0.3, 0.22, 0.28], [0.0] * 5)))
    args = ablate.parse_args(["--study", "headline", "--out", str(tmp_path)])
    study = ablate.STUDIES["headline"]
    cells = [(k, s) for k in study.sets for s in range(study.seeds[k])]
    warm, runs = ablate.planned(study, args, str(tmp_path / "r"), "headline", cells)
    assert len(runs) == 5 * (5 + 10) and warm[0][1][warm[0][1].index("--sft-box-scale") + 1] == "1.7,1.9"
    medloc = next(f for d, f in runs if d.endswith("us-s9/medloc"))
    assert medloc[medloc.index("--steps") + 1] == "1000" and medloc[medloc.index("--train-size") + 1] == "128"
    assert medloc[-2:] == ["--adv-scale", "none"] and medloc[medloc.index("--eval-every") + 1] == "250"
    sft = next(f for d, f in runs if d.endswith("derm-s0/sft"))
    assert "--adv-scale" not in sft


def test_the_ranking_at_each_evaluation_orders_the_rows_by_their_mean(tmp_path):
    study = dataclasses.replace(ablate.STUDIES["headline"], sets=("derm",), rows={"a": [], "b": []}, ranked=(1, 2))
    curves = {("derm", "a", 0): ([{"step": 1, "eval_A@0.8": 0.2}, {"step": 2}], {"A@0.8": 0.1}),
              ("derm", "a", 1): ([{"step": 1, "eval_A@0.8": 0.4}, {"step": 2}], {"A@0.8": 0.3}),
              ("derm", "b", 0): ([{"step": 1, "eval_A@0.8": 0.1}, {"step": 2}], {"A@0.8": 0.5}),
              ("derm", "b", 1): ([{"step": 1, "eval_A@0.8": 0.1}, {"step": 2}], {"A@0.8": 0.5})}
    assert ablate.ranking_table(study, curves, (1, 2)).splitlines()[2:] == [
        "| synth:derm | 1 | a 30.0, b 10.0 |", "| synth:derm | 2 | b 50.0, a 20.0 |"]
