"""--report-to: TensorBoard event files read back with tensorboard's own reader, and a W&B offline
run's log read back record by record, hold what metrics.jsonl holds, step by step; a resumed run
writes no step twice; the sampled completions are there; a missing package is one line."""
import json
import os
import shutil

import pytest

import config
import train
import trackers

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
SMALL = ["--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4", "--eval-n", "6", "--threads", "1"]
KEYS = ("reward_mean", "hit_rate", "tau", "loss", "kl", "frac_equal_groups")


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(run):
    """{tag: [(step, value)]} as TensorBoard shows it (its reader applies the purges of resumed runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def wandb_history(run):
    """The history records of the W&B offline run in RUN/wandb: its .wandb file is a LevelDB-style
    log (a 7-byte header, then 32 KiB blocks of records: checksum, length, type, data) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb
    folder = next(f for f in os.listdir(os.path.join(run, "wandb")) if f.startswith("offline-run-"))
    path = next(os.path.join(run, "wandb", folder, f) for f in os.listdir(os.path.join(run, "wandb", folder))
                if f.endswith(".wandb"))
    raw, pos, pieces, records = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pieces)
            pieces = b""
    history = []
    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return history


def wandb_flushed():
    """Wait for W&B's service to write everything out: run.finish() hands the last records to a
    separate writer process, which on a busy machine may not have written them yet."""
    import wandb
    wandb.teardown()


def test_tensorboard_holds_metrics_jsonl_per_step_samples_and_a_resume_without_duplicates(tmp_path):
    run = str(tmp_path / "run")
    train.main(SMALL + ["--steps", "3", "--save-every", "2", "--out", run, "--report-to", "tensorboard",
                        "--log-samples-every", "2"])
    # as if killed after logging step 3 but before its checkpoint: resume from step 2, to step 4
    for name in ("checkpoint-000003", "final", "eval.json"):
        shutil.rmtree(os.path.join(run, name)) if os.path.isdir(os.path.join(run, name)) else os.remove(os.path.join(run, name))
    train.main(["--resume", run, "--steps", "4"])
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    scalars, acc = tensorboard_scalars(run)
    for key in KEYS:
        assert [s for s, _ in scalars[key]] == [1, 2, 3, 4], key  # each step once, the resumed step 3 replacing the old
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in log], rel=1e-6, abs=1e-7), key
    assert [s for s, _ in scalars["tau_changed"]] == [1, 2, 3, 4]
    evaluated = json.load(open(os.path.join(run, "eval.json")))
    assert scalars["eval/A@0.5"] == [(4, pytest.approx(evaluated["A@0.5"]))]
    images = acc.Tags()["images"]
    assert "samples/0" in images and [e.step for e in acc.Images("samples/0")] == [2, 4]
    first = acc.Images("samples/0")[0]
    from data import load_dataset
    assert (first.width, first.height) == load_dataset("synth:derm:test", n=1)[0].image_size  # the first test image
    assert {"config/text_summary", "samples/text_summary"} <= set(acc.Tags()["tensors"])


def test_sampling_for_the_trackers_leaves_the_run_as_it_would_have_been(tmp_path):
    watched, plain = str(tmp_path / "w"), str(tmp_path / "p")
    train.main(SMALL + ["--steps", "3", "--out", watched, "--report-to", "tensorboard", "--log-samples-every", "1"])
    train.main(SMALL + ["--steps", "3", "--out", plain])
    drop = ("step_seconds", "seconds_rollout", "seconds_reward", "seconds_reference", "seconds_policy_forward",
            "seconds_backward", "seconds_optimizer")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_log(watched)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_log(plain)]


def test_a_wandb_offline_run_holds_the_same_history_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing may be written there: W&B's logs stay in the run
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))  # curves.png's font cache: not W&B's to keep out
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    monkeypatch.setattr(trackers.WandB, "cache_set", None)
    run = str(tmp_path / "run")
    train.main(SMALL + ["--steps", "2", "--save-every", "1", "--out", run, "--report-to", "wandb",
                        "--log-samples-every", "2", "--run-group", "study-x"])
    wandb_flushed()
    assert os.environ["WANDB_CACHE_DIR"] == os.path.join(run, "wandb", "cache")
    run_id = open(os.path.join(run, "wandb_id")).read().strip()
    assert not os.path.exists(tmp_path / "home" / ".cache")
    history = [h for h in wandb_history(run) if "reward_mean" in h]
    log = read_log(run)
    assert [h["_step"] for h in history] == [r["step"] for r in log]
    for key in KEYS:
        assert [h[key] for h in history] == pytest.approx([r[key] for r in log], rel=1e-6, abs=1e-7)
    tables = [h for h in wandb_history(run) if h.get("samples/_type") == "table-file"]
    assert [(h["_step"], h["samples/nrows"]) for h in tables] == [(2, 4)]  # two completions of two samples
    os.remove(os.path.join(run, "eval.json"))
    train.main(["--resume", run, "--steps", "3"])
    wandb_flushed()
    assert open(os.path.join(run, "wandb_id")).read().strip() == run_id
    runs = [f for f in os.listdir(os.path.join(run, "wandb")) if f.startswith("offline-run-")]
    assert all(f.endswith(run_id) for f in runs)  # the same W&B run continued


def test_report_to_is_checked_with_the_other_flags():
    assert trackers.parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert trackers.parse_report_to("none") == []
    for bad in ("tensorbord", "none,wandb", ","):
        with pytest.raises(ValueError, match="none, or one or more of tensorboard, wandb"):
            trackers.parse_report_to(bad)
    with pytest.raises(SystemExit, match="--report-to 'mlflow': none, or one or more"):
        train.main(["--report-to", "mlflow", "--steps", "1"])
    with pytest.raises(ValueError, match="tensorboard named twice"):  # two writers: every step shown twice
        trackers.parse_report_to("tensorboard,wandb,tensorboard")
    with pytest.raises(SystemExit, match="--log-samples-every 5: goes with --report-to"):  # never silently ignored
        train.main(["--log-samples-every", "5", "--steps", "1"])


def test_a_missing_tracker_package_is_one_line_naming_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert config.tracker_problems("tensorboard,wandb") == ["--report-to wandb needs the wandb package: pip install wandb"]


def test_a_tracker_that_cannot_start_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "tensorboard").write_text("not a folder")
    with pytest.raises(SystemExit, match="tensorboard is a file; TensorBoard writes its events into that folder"):
        train.main(SMALL + ["--report-to", "tensorboard", "--out", str(run)])
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(SystemExit, match="--report-to wandb: not logged in"):
        train.main(SMALL + ["--report-to", "wandb", "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # said before the run folder or the model
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k\n")
    assert config.tracker_problems("wandb") == []
