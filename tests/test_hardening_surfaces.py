"""The surfaces added after the first hardening round, through the command line: classification
data and labels files, the .npz converter, LoRA adapter folders, model folders that would run code,
the run folder's lock and leftovers, finishing an interrupted run. Each mistake ends in one line
naming the file and field (or flag) before expensive work; nothing is lost or left half-made."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
import eval as ev
import files
import lora
import rundir
import tasks
import train
from data import SYNTH_LABELS, Labels
from model import load_vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFY = ["--task", "classify", "--threads", "1", "--eval-dataset", "none"]


def error_of(argv, main=train.main):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert "Traceback" not in message
    return message


def labels_file(path, classes, **extra):
    path.write_text(json.dumps({"classes": classes, **extra}))
    return str(path)


def class_set(folder, n=4):
    """A JSONL classification set of `n` small images labelled a / b alternately."""
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (90, 60, 40)).save(folder / "x.png")
    (folder / "d.jsonl").write_text("".join(json.dumps({"image": "x.png", "label": "ab"[i % 2]}) + "\n"
                                            for i in range(n)))
    return str(folder / "d.jsonl")


# ----------------------------------------------------------------------------- text files and classes
def test_a_labels_file_that_is_not_utf8_names_the_byte(tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_bytes(b'{"classes": ["a", "b\xff"]}')
    message = error_of(CLASSIFY + ["--dataset", class_set(tmp_path / "d"), "--labels", str(bad),
                                   "--out", str(tmp_path / "r")])
    assert f"{bad}: not UTF-8 at byte 20" in message and not (tmp_path / "r" / "config.json").exists()
    knowledge = error_of(CLASSIFY + ["--dataset", "synth:grade", "--knowledge", str(bad), "--out", str(tmp_path / "k")])
    assert "not UTF-8 at byte 20" in knowledge


@pytest.mark.parametrize("names", [["grade 1", "Grade  1."], ["a b", "a  b"], ["x", "X."]])
def test_classes_one_answer_cannot_tell_apart_are_refused(tmp_path, names):
    path = labels_file(tmp_path / "labels.json", names)
    message = error_of(CLASSIFY + ["--dataset", class_set(tmp_path / "d"), "--labels", path, "--out", str(tmp_path / "r")])
    assert f"{path}: field 'classes'" in message and "no answer could tell them apart" in message


def test_prompt_text_is_bounded_before_anything_loads(tmp_path):
    long = labels_file(tmp_path / "long.json", [{"name": n, "description": "dark " * 4000} for n in
                                                  SYNTH_LABELS["type"].names])
    message = error_of(CLASSIFY + ["--dataset", "synth:type", "--knowledge", long, "--out", str(tmp_path / "r")])
    assert f"{long}: field 'classes[0]'" in message and "description at most 500" in message
    question = labels_file(tmp_path / "q.json", ["a", "b"], question="why " * 1000)
    assert "field 'question': 4,000 characters, at most 2,000" in error_of(
        CLASSIFY + ["--dataset", class_set(tmp_path / "d"), "--labels", question, "--out", str(tmp_path / "q")])


def test_paths_that_are_not_regular_files_are_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # reading a named pipe would block forever
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "pipe.png", "problem": "q", "solution": [1, 1, 5, 5]}) + "\n")
    message = error_of(["--dataset", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r")])
    assert "d.jsonl:1: field 'image'" in message and "pipe.png is not a regular file" in message
    os.mkfifo(tmp_path / "labels.json")
    assert "is not a regular file" in error_of(CLASSIFY + ["--dataset", class_set(tmp_path / "c"), "--labels",
                                                           str(tmp_path / "labels.json"), "--out", str(tmp_path / "l")])


def test_the_notice_without_evaluation_says_why(tmp_path, capsys):
    train.main(CLASSIFY + ["--dataset", "synth:grade", "--algo", "sft", "--steps", "1", "--batch-prompts", "2",
                           "--out", str(tmp_path / "r")])
    assert "no evaluation at the end: --eval-dataset none;" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a model of the other task
def classifier_folder(path):
    vlm = load_vlm("tiny")
    vlm.run_fields = tasks.Classification(SYNTH_LABELS["grade"], False, "short").fields()
    vlm.save(str(path))
    return str(path)


@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_a_grounding_run_from_a_classifier_is_refused(tmp_path, algo):
    folder = classifier_folder(tmp_path / "clf")
    message = error_of(["--init", folder, "--algo", algo, "--steps", "1", "--eval-dataset", "none",
                        "--out", str(tmp_path / "r")])
    assert f"{folder} is a classification model" in message


def test_resume_refuses_a_labels_file_whose_classes_moved(tmp_path):
    path = labels_file(tmp_path / "labels.json", ["a", "b"])
    run = str(tmp_path / "r")
    train.main(CLASSIFY + ["--dataset", class_set(tmp_path / "d"), "--labels", path, "--algo", "sft", "--steps", "1",
                           "--batch-prompts", "2", "--out", run])
    labels_file(tmp_path / "labels.json", ["b", "a"])  # index 0 would now mean "b"
    message = error_of(["--resume", run, "--steps", "2"])
    assert "the run's classes were ['a', 'b'], its labels now give ['b', 'a']" in message


# ----------------------------------------------------------------------------- the .npz converter
def npz_main(argv):
    return error_of(argv, prepare.main)


def test_npz_inputs_that_are_not_medmnist_archives_are_one_line(tmp_path):
    names = ["--names", "a,b", "--out", str(tmp_path / "out")]
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.uint8))
    assert "not a .npz archive" in npz_main(["npz", str(tmp_path / "x.npy")] + names)
    np.savez(tmp_path / "ok.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([0, 1]))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:300])
    assert "not a .npz archive" in npz_main(["npz", str(tmp_path / "cut.npz")] + names)
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (50_000, 50_000, 3)  # 60 GB claimed by a few bytes
    import io
    import zipfile
    fake = io.BytesIO()
    np.lib.format.write_array_header_1_0(fake, header)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("train_images.npy", fake.getvalue())
        z.writestr("train_labels.npy", fake.getvalue())
    assert "claims (50000, 50000, 3) float64" in npz_main(["npz", str(tmp_path / "huge.npz")] + names)


def test_npz_outputs_that_cannot_be_written_or_hold_another_set_are_refused(tmp_path):
    np.savez(tmp_path / "ok.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([0, 1]),
             test_images=np.zeros((1, 8, 8), np.uint8), test_labels=np.array([1]))
    (tmp_path / "file").write_text("x")
    assert "file: a file, not a folder" in npz_main(["npz", str(tmp_path / "ok.npz"), "--names", "a,b",
                                                         "--out", str(tmp_path / "file")])
    out = str(tmp_path / "out")
    prepare.main(["npz", str(tmp_path / "ok.npz"), "--names", "a,b", "--out", out])
    prepare.main(["npz", str(tmp_path / "ok.npz"), "--names", "a,b", "--split", "test", "--out", out])
    before = (tmp_path / "out" / "labels.json").read_text()
    assert "holds a conversion with other classes" in npz_main(["npz", str(tmp_path / "ok.npz"), "--names",
                                                                "x,y", "--out", out])
    assert (tmp_path / "out" / "labels.json").read_text() == before  # the other set is untouched


# ----------------------------------------------------------------------------- LoRA adapters
def test_lora_targets_are_checked_before_any_warm_start(tmp_path):
    assert "--lora-targets '(': not a regular expression" in error_of(
        ["--lora-rank", "4", "--lora-targets", "(", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    run = tmp_path / "b"
    message = error_of(["--lora-rank", "4", "--lora-targets", "nothing", "--sft-steps", "50", "--out", str(run)])
    assert "matches no linear layer" in message and not (run / "warmstart").exists()
    assert "ties to its input embeddings" in error_of(["--lora-rank", "4", "--lora-targets", "lm_head",
                                                       "--out", str(tmp_path / "c")])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A saved adapter folder of a classifier on the built-in tiny model (no --init: random base)."""
    out = tmp_path_factory.mktemp("lora")
    run = str(out / "run")
    train.main(CLASSIFY + ["--dataset", "synth:grade", "--sft-steps", "0", "--steps", "1", "--batch-prompts", "2",
                           "--group-size", "2", "--lora-rank", "2", "--max-new-tokens", "4", "--out", run])
    return out, run, rundir.checkpoints(run)[-1] + "/model"


def test_adapters_of_the_built_in_model_name_a_base_folder_and_their_task(adapters):
    _, run, folder = adapters
    base = lora.read_config(folder)["base_model_name_or_path"]
    assert base == os.path.abspath(os.path.join(run, "warmstart", "model")) and os.path.isdir(base)
    assert tasks.saved_labels(folder).names == SYNTH_LABELS["grade"].names  # eval.py sees a classifier


def test_a_moved_run_s_adapters_find_their_base(adapters, tmp_path):
    _, run, _ = adapters
    moved = str(tmp_path / "moved")
    import shutil
    shutil.copytree(run, moved)
    shutil.move(os.path.join(run, "warmstart"), str(tmp_path / "gone"))  # the old base path no longer exists
    try:
        folder = rundir.checkpoints(moved)[-1] + "/model"
        assert lora.base_of(folder) == os.path.join(moved, "warmstart", "model")
        assert load_vlm(folder).base_name == os.path.join(moved, "warmstart", "model")
    finally:
        shutil.move(str(tmp_path / "gone"), os.path.join(run, "warmstart"))


def tamper(folder, tmp_path, edit_config=None, edit_tensors=None):
    import shutil
    from safetensors.torch import load_file, save_file
    copy = str(tmp_path / "tampered")
    shutil.copytree(folder, copy)
    path = os.path.join(copy, "adapter_config.json")
    config = json.load(open(path))
    if edit_config:
        edit_config(config, copy)
    json.dump(config, open(path, "w"))
    if edit_tensors:
        tensors = load_file(os.path.join(copy, "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, os.path.join(copy, "adapter_model.safetensors"))
    return copy


@pytest.mark.parametrize("config_edit, tensor_edit, message", [
    (lambda c, f: c.update(r=3), None, "rank r = 3 of adapter_config.json needs"),
    (lambda c, f: c.update(base_model_name_or_path=f), None, "names the adapter folder itself"),
    (lambda c, f: c.update(target_modules=c["target_modules"][:1]), None, "target_modules disagree"),
    (None, lambda t: next(v for k, v in t.items() if "lora_B" in k).fill_(float("nan")), "holds non-finite values"),
    (lambda c, f: c.update(r=0), None, "field 'r' must be in 1..4096"),
])
def test_a_tampered_adapter_folder_is_one_line(adapters, tmp_path, config_edit, tensor_edit, message):
    folder = tamper(adapters[2], tmp_path, config_edit, tensor_edit)
    assert message in error_of(["--model", folder, "--dataset", "synth:grade", "--n", "1"], ev.main)


def test_adapters_that_name_other_adapters_as_base_are_refused(adapters, tmp_path):
    folder = tamper(adapters[2], tmp_path, lambda c, f: c.update(base_model_name_or_path=adapters[2]))
    assert "names adapters" in error_of(["--model", folder, "--dataset", "synth:grade", "--n", "1"], ev.main)


# ----------------------------------------------------------------------------- model folders that would run code
def test_a_config_that_names_custom_code_is_refused_without_asking(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil_vlm",
                                                      "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (tmp_path / "evil.py").write_text("open('PWNED', 'w')\n")
    done = subprocess.run([sys.executable, "train.py", "--model", str(tmp_path), "--out", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "[y/N]" not in done.stdout + done.stderr
    assert f"{tmp_path}: not a model folder" in done.stderr and not (tmp_path / "PWNED").exists()


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_and_a_hostile_chat_template_are_one_line(tmp_path):
    folder = tmp_path / "m"
    load_vlm("tiny").model.config.save_pretrained(folder)
    load_vlm("tiny").processor.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Payload(str(tmp_path / "pwned"))}, f)
    message = error_of(["--model", str(folder), "--out", str(tmp_path / "r")])
    assert f"{folder}: cannot be loaded" in message and not (tmp_path / "pwned").exists()
    (folder / "pytorch_model.bin").unlink()
    load_vlm("tiny").model.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert f"{folder}: cannot be loaded (SecurityError" in error_of(["--model", str(folder), "--out", str(tmp_path / "s")])



def test_a_folder_without_its_tokenizer_or_with_broken_json_names_the_folder(tmp_path):
    """transformers' own ValueErrors (a tokenizer it cannot build, a config that is not JSON) come
    out as one line that says which folder, not as the bare library message."""
    folder = tmp_path / "m"
    tiny = load_vlm("tiny")
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    assert error_of(["--model", str(folder), "--out", str(tmp_path / "r")]).startswith(
        f"error: {folder}: cannot be loaded (ValueError: ")
    (folder / "config.json").write_text("{broken")
    text = error_of(["--model", str(folder), "--out", str(tmp_path / "s")])
    assert text.startswith(f"error: --model {folder}: not a model folder (") and "hub id" not in text  # read before anything loads

# ----------------------------------------------------------------------------- the run folder
def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, run / ".lock")
    assert "is a symbolic link" in error_of(["--algo", "sft", "--steps", "1", "--out", str(run)])
    assert victim.read_text() == "precious"


def test_a_leftover_temp_entry_that_is_a_symlink_is_removed_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    os.symlink(target, run / "checkpoint-000001.tmp")
    rundir.remove_leftovers(str(run))
    assert not os.path.lexists(run / "checkpoint-000001.tmp") and (target / "keep").exists()


def test_a_run_killed_after_its_last_checkpoint_finishes_its_evaluation_on_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["--algo", "sft", "--dataset", "synth:derm", "--steps", "2", "--batch-prompts", "2", "--eval-n", "3",
            "--threads", "1", "--out", run]
    train.main(argv)
    expected = json.load(open(os.path.join(run, "eval.json")))
    os.remove(os.path.join(run, "eval.json"))  # killed during the final evaluation
    train.main(["--resume", run])
    assert json.load(open(os.path.join(run, "eval.json"))) == expected
    assert "trained all 2 steps; finishing" in capsys.readouterr().out
    assert "pass --steps above that" in error_of(["--resume", run])  # now it is finished


def test_a_second_torchrun_job_on_a_held_folder_is_refused_on_every_rank(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    import socket
    with socket.socket() as s:  # a free local port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with files.Lock(run):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", "--algo", "sft",
                               "--out", run, "--device", "cpu", "--threads", "1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.count("in use by another train.py") == 2  # both ranks say it
    assert 'train.py", line' not in done.stderr  # no frame of ours (torchrun's launcher reports the exit codes)
    assert "terminate called" not in done.stderr and "exitcode  : 1" in done.stderr  # a clean exit, not an abort
    assert os.listdir(run) == [".lock"]
