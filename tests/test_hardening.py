"""A user's mistakes end in one clear line, a run never saves a non-finite model, a shared run
folder never runs code, and a stopped, killed or damaged run resumes from what is intact."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import files
import model
import rundir
import start
import train
from config import Config

TINY_SFT = ["--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "2", "--eval-dataset", "none",
            "--threads", "1"]


def sft_run(path, steps=2, *extra):
    train.main(TINY_SFT + ["--steps", str(steps), "--out", str(path), "--save-every", "1", *extra])
    return str(path)


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def error_of(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value.code)


# ----------------------------------------------------------------------------- no code from a run folder
class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling this would create the file


def test_a_crafted_trainer_state_is_refused_and_runs_nothing(tmp_path):
    run = sft_run(tmp_path / "run", 2)
    victim = tmp_path / "pwned"
    for ck in rundir.checkpoints(run):
        with open(os.path.join(ck, "trainer_state.pt"), "wb") as f:
            pickle.dump({"step": 2, "x": Payload(str(victim))}, f)
    message = error_of(["--resume", run, "--steps", "4"])
    assert not victim.exists()
    assert "no intact checkpoint" in message


def test_trainer_state_is_plain_data(tmp_path):
    run = sft_run(tmp_path / "run", 1)
    state = torch.load(os.path.join(rundir.checkpoints(run)[-1], "trainer_state.pt"), weights_only=True)
    assert state["step"] == 1 and {"torch", "numpy", "python"} <= set(state["rng"][0])


# ----------------------------------------------------------------------------- non-finite training stops
@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_a_diverging_run_stops_before_saving_anything_non_finite(tmp_path, algo, warm):
    run = str(tmp_path / "run")
    argv = TINY_SFT + ["--lr", "1e4", "--steps", "6"] if algo == "sft" else \
        ["--init", warm, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4", "--lr", "10",
         "--steps", "6", "--eval-dataset", "none", "--reward", "iou", "--threads", "1"]
    message = error_of(argv + ["--out", run, "--save-every", "1"])
    assert "not finite" in message or "non-finite" in message or " is nan" in message or " is inf" in message
    assert message.startswith("error: step ") and "\n" not in message
    assert not os.path.exists(os.path.join(run, "final"))
    for ck in rundir.checkpoints(run):  # whatever was saved before is finite
        assert rundir.all_finite(model.load_vlm(os.path.join(ck, "model")).model)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_the_log_writes_non_finite_numbers_as_null(tmp_path):
    path = str(tmp_path / "m.jsonl")
    rundir.log_line(path, {"step": 1, "kl": float("nan"), "loss": float("inf"), "ok": 0.5})
    assert json.loads(open(path).read()) == {"step": 1, "kl": None, "loss": None, "ok": 0.5}


# ----------------------------------------------------------------------------- one trainer per folder
def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    run = sft_run(tmp_path / "run", 1)
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    with files.Lock(run), files.Lock(fresh):
        assert f"in use by another train.py (pid {os.getpid()})" in error_of(TINY_SFT + ["--out", fresh])
        assert "in use" in error_of(["--resume", run, "--steps", "2"])
    train.main(["--resume", run, "--steps", "2"])  # released; the lock file left behind is not a lock
    sft_run(fresh, 1)


# ----------------------------------------------------------------------------- data
def write(path, records, raw=None):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) if isinstance(r, dict) else r).encode() + b"\n")
        if raw:
            f.write(raw)
    return str(path)


@pytest.fixture
def images(tmp_path):
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])  # good header, broken body
    Image.fromarray(np.zeros((1, 300), np.uint8)).save(tmp_path / "thin.png")  # aspect ratio 300
    return tmp_path


@pytest.mark.parametrize("record, message", [
    ({"image": "truncated.png", "problem": "q", "solution": [1, 1, 5, 5]}, "unreadable image"),
    ({"image": "thin.png", "problem": "q", "solution": [1, 0, 5, 1]}, "aspect ratios up to 200"),
    ({"image": "ok.png", "problem": "q" * 100_000, "solution": [1, 1, 5, 5]}, "100,000 characters"),
    ('{"image": "ok.png", "problem": "caf\xe9", "solution": [1, 1, 5, 5]}', None),  # latin-1 byte below
])
def test_records_that_would_fail_mid_run_are_caught_up_front(images, record, message):
    good = {"image": "ok.png", "problem": "q", "solution": [1, 1, 5, 5]}
    if message is None:  # a non-UTF-8 byte: that line is the error, and --skip-invalid keeps going
        path = str(images / "d.jsonl")
        with open(path, "wb") as f:
            f.write(json.dumps(good).encode() + b"\n" + record.encode("latin-1") + b"\n"
                    + json.dumps(good).encode() + b"\n")
        message = "not valid UTF-8 (byte 0xe9"
    else:
        path = write(images / "d.jsonl", [good, record, good])
    text = error_of(TINY_SFT + ["--dataset", path, "--out", str(images / "run")])
    assert f"d.jsonl:2: " in text and message in text
    from data import load_jsonl
    assert len(load_jsonl(path, skip_invalid=True)) == 2


def test_box_formats_and_normalised_boxes(images):
    norm = write(images / "n.jsonl", [{"image": "ok.png", "problem": "q", "solution": [0.1, 0.2, 0.5, 0.6]}] * 2)
    assert "n.jsonl:1: field 'solution': box [0.1, 0.2, 0.5, 0.6] (xyxy) is 0.4 x 0.4 pixels, under one pixel wide " \
           "or high; it looks normalised (pass --box-format norm1" in error_of(TINY_SFT + ["--dataset", norm, "--out",
                                                                                      str(images / "r1")])
    from data import DataError, load_jsonl
    assert load_jsonl(norm, box_format="norm1")[0].box == pytest.approx((8, 12, 40, 36))
    with pytest.raises(DataError, match=r"\(norm1000\) is 0.032 x 0.024 pixels, under one pixel wide or high"):
        load_jsonl(norm, box_format="norm1000")  # 0..1 boxes read as 0..1000: a box a tenth of a pixel wide
    xywh = write(images / "w.jsonl", [{"image": "ok.png", "problem": "q", "solution": [30, 20, 10, 5]}])
    assert "pass --box-format xywh" in error_of(TINY_SFT + ["--dataset", xywh, "--out", str(images / "r2")])
    assert load_jsonl(xywh, box_format="xywh")[0].box == (30, 20, 40, 25)


# ----------------------------------------------------------------------------- flags
BAD_FLAGS = [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be (0, 10]"),
    (["--tau0", "0.9", "--tau-target", "0.5"], "--tau0 0.9 is above --tau-target 0.5"),
    (["--window", "1"], "--window 1: must be >= 2"),
    (["--stages", "0.5:0.8"], "fractions must start at 0"),
    (["--stages", "0-0.5"], "fraction:tau pairs"),
    (["--save-every", "0"], "--save-every 0: must be >= 1"),
    (["--eval-n", "-1"], "--eval-n -1: must be >= 1"),
    (["--threads", "-1"], "--threads -1: must be [0, 1024]"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be [1, 32768]"),
    (["--steps", "-1"], "--steps -1: must be >= 1"),
    (["--eps", "1.5"], "--eps 1.5: must be (0, 1)"),
    (["--tau", "1.5"], "--tau 1.5: must be [0, 1]"),
    (["--beta", "-1"], "--beta -1.0: must be [0, 100]"),
    (["--sft-steps", "-1"], "--sft-steps -1: must be >= 0"),
    (["--lr", "nan"], "--lr nan: not a finite number"),
    (["--group-size", "1"], "--group-size 1: must be >= 2"),
    (["--micro-batch", "3"], "whole groups"),
    (["--max-pixels", "500"], "--max-pixels 500: must be >= 784"),
    (["--min-pixels", "200704", "--max-pixels", "100352"], "--min-pixels 200704 is above --max-pixels"),
    (["--ref-model", "none"], "needs a reference model"),
    (["--schedule", "raw-iou", "--reward", "threshold"], "raw-iou has no tau"),
    (["--updates-per-rollout", "0"], "--updates-per-rollout 0: must be [1, 100]"),
    (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
    (["--task", "classify", "--labels", "/no/labels.json"], "--labels (a labels file): file not found: /no/labels.json"),
    (["--task", "classify", "--dataset", "synth:grade", "--knowledge", "/no/k.json"],
     "--knowledge (a labels file): file not found: /no/k.json"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "CUDA is not available on this machine"))


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_flag_has_a_range_checked_before_anything_loads(argv, message, monkeypatch, tmp_path):
    monkeypatch.setattr(start, "load_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(start, "load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    text = error_of(argv + ["--out", str(tmp_path / "run")])
    assert text.startswith("error: ") and message in text
    assert not (tmp_path / "run").exists()



def test_a_reference_that_reads_tokens_otherwise_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """--ref-model scores the policy's token ids and image patches: another vocabulary (an
    IndexError at its first forward, after the set-up) or other vision token ids are one line, from
    the two config.json files alone."""
    monkeypatch.setattr(start, "load_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    policy, ref = tmp_path / "policy", tmp_path / "ref"
    model.load_vlm("tiny").model.config.save_pretrained(policy)
    config = json.loads((policy / "config.json").read_text())
    for change, said in [(("text_config", "vocab_size", 151_936), "its text_config.vocab_size is 151936"),
                         ((None, "image_token_id", 7), "its image_token_id is 7")]:
        changed = json.loads(json.dumps(config))
        section, key, value = change
        (changed[section] if section else changed)[key] = value
        ref.mkdir(exist_ok=True)
        (ref / "config.json").write_text(json.dumps(changed))
        text = error_of(["--model", str(policy), "--ref-model", str(ref), "--out", str(tmp_path / "r")])
        assert text.startswith(f"error: --ref-model {ref}: {said}, the policy's ({policy}) "), text
    (ref / "config.json").write_text(json.dumps(config))
    start.check_models(Config(model=str(policy), ref_model=str(ref)))  # the same model: accepted

def test_every_problem_is_listed_in_one_message():
    text = error_of(["--lr", "-1", "--window", "1", "--steps", "0"])
    assert all(s in text for s in ("--lr -1.0", "--window 1", "--steps 0"))


def test_resume_refuses_flags_that_would_change_the_run(tmp_path):
    run = sft_run(tmp_path / "run", 1)
    text = error_of(["--resume", run, "--steps", "3", "--lr", "0.5"])
    assert "refused: --lr 0.5 (the run has" in text
    train.main(["--resume", run, "--steps", "2", "--threads", "1"])  # steps, device, threads may change
    assert [r["step"] for r in read_log(run)] == [1, 2]


# ----------------------------------------------------------------------------- resume
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    run = sft_run(tmp_path / "run", 2)
    whole = read_log(run)
    latest = rundir.checkpoints(run)[-1]
    weights = os.path.join(latest, "model", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a line cut off by a kill
    train.main(["--resume", run, "--steps", "3"])
    out = capsys.readouterr().out
    assert "skipping a damaged checkpoint" in out and "resumed" in out and "at step 1" in out
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[1]["loss"] == pytest.approx(whole[1]["loss"], rel=1e-5)  # step 2 redone identically


def test_an_empty_trainer_state_is_passed_over_and_none_intact_is_a_clear_error(tmp_path):
    run = sft_run(tmp_path / "run", 1)
    open(os.path.join(rundir.checkpoints(run)[-1], "trainer_state.pt"), "w").close()
    assert "no intact checkpoint" in error_of(["--resume", run, "--steps", "2"])


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    run = sft_run(tmp_path / "run", 2)
    for ck in rundir.checkpoints(run):
        os.rename(ck, ck + ".tmp")  # as if killed while writing the first checkpoint
    train.main(["--resume", run])
    assert "no checkpoint yet: starting it again" in capsys.readouterr().out
    assert [r["step"] for r in read_log(run)] == [1, 2] and not list((tmp_path / "run").glob("*.tmp"))


def test_a_moved_run_folder_resumes_from_another_directory(tmp_path, monkeypatch):
    run = str(tmp_path / "a" / "run")
    train.main(["--dataset", "synth:derm", "--sft-steps", "2", "--sft-batch", "2", "--steps", "1",
                "--batch-prompts", "1", "--group-size", "2", "--out", run, "--eval-dataset", "none",
                "--threads", "1"])
    moved = str(tmp_path / "b" / "moved")
    os.makedirs(os.path.dirname(moved))
    os.rename(run, moved)
    monkeypatch.chdir(tmp_path / "b")
    train.main(["--resume", "moved", "--steps", "2"])  # the KL reference is the warm start inside it
    assert [r["step"] for r in read_log(moved)] == [1, 2]


# ----------------------------------------------------------------------------- the run folder itself
def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "a file, not a folder" in error_of(TINY_SFT + ["--out", str(tmp_path / "f")])


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tmp_path, monkeypatch, capsys):
    real = train.train_step

    def interrupted(run, train_set, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, train_set, step)
    monkeypatch.setattr(train, "train_step", interrupted)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(TINY_SFT + ["--steps", "5", "--out", run, "--save-every", "1"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert f"stopped at step 2; last checkpoint: checkpoint-000002; resume with: python train.py --resume {run}" in err
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_disk_full_while_saving_the_final_model_keeps_the_checkpoint(tmp_path, monkeypatch):
    import errno

    def full(self, folder, weights=None, dtype=None):
        os.makedirs(folder, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device")
    run = str(tmp_path / "run")
    real = rundir.save_model
    monkeypatch.setattr(rundir, "save_model", lambda p, f, w, d=None: (monkeypatch.setattr(model.VLM, "save", full),
                                                                       real(p, f, w, d)))
    text = error_of(TINY_SFT + ["--steps", "1", "--out", run])
    assert "disk full" in text and "final" in text
    assert rundir.checkpoints(run) and not os.path.exists(os.path.join(run, "final.tmp"))


def test_eval_points_from_a_run_folder_to_its_final_model(tmp_path):
    run = sft_run(tmp_path / "run", 1)
    with pytest.raises(SystemExit, match="did you mean .*run/final"):
        ev.main(["--model", run, "--dataset", "synth:derm", "--n", "1"])


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n 0: must be >= 1"),
                                           (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
                                           (["--max-pixels", "10"], "--max-pixels 10: must be >= 784"),
                                           (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N")])
def test_eval_flags_are_checked_before_loading(argv, message, monkeypatch):
    monkeypatch.setattr(ev, "load_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=message):
        ev.main(["--model", "tiny", "--dataset", "synth:derm"] + argv)
