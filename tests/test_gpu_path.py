"""What a GPU user meets first, simulated on CPU: a checkpoint written on a GPU resumes here,
set-up makes no needless copy of a model, final/ is written in the dtype the model was published
in, adapters name their base by an absolute path, eval.py decodes as long as the run did."""
import copy
import json
import os
import zipfile

import torch
from safetensors import safe_open

import lora
import rundir
import train
from model import load_vlm

SFT = ["--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "2", "--eval-dataset", "none", "--threads", "1"]


def read_log(run):
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
            for line in open(os.path.join(run, "metrics.jsonl"))]


def as_if_saved_on_cuda(path):
    """Rewrite a torch.save file's storage locations from cpu to cuda:0, as a GPU run writes them."""
    with zipfile.ZipFile(path) as z:
        items = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(info, data)


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu_exactly(tmp_path, capsys):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(SFT + ["--steps", "4", "--out", whole])
    train.main(SFT + ["--steps", "2", "--save-every", "1", "--out", split])
    as_if_saved_on_cuda(os.path.join(rundir.checkpoints(split)[-1], "trainer_state.pt"))
    capsys.readouterr()
    train.main(["--resume", split, "--steps", "4"])
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 2" in out and "skipping" not in out  # the newest one, not a step back
    assert read_log(split) == read_log(whole)
    a, b = load_vlm(os.path.join(whole, "final")).model.state_dict(), load_vlm(os.path.join(split, "final")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_loads_its_reference_instead_of_copying_a_model(tmp_path, monkeypatch, warm):
    run = str(tmp_path / "run")
    args = ["--init", warm, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "2",
            "--eval-dataset", "none", "--threads", "1", "--save-every", "1", "--reward", "iou"]
    train.main(args + ["--steps", "1", "--out", run])
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: pytest_fail_if_model(x) or deepcopy(x, *a))
    train.main(["--resume", run, "--steps", "2"])  # policy from the checkpoint, reference loaded: one each
    assert len(read_log(run)) == 2


def pytest_fail_if_model(x):
    if isinstance(x, torch.nn.Module):
        raise AssertionError("set-up made a whole copy of a model")


def bf16_published(folder):
    """The tiny model saved the way Qwen's checkpoints are: bf16 weights, config dtype bfloat16."""
    vlm = load_vlm("tiny")
    vlm.model.to(torch.bfloat16).save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    return str(folder)


def dtypes(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_final_is_written_in_the_published_dtype_unless_asked(tmp_path):
    base = bf16_published(tmp_path / "base")
    run = str(tmp_path / "run")
    train.main(SFT + ["--model", base, "--steps", "2", "--save-every", "1", "--out", run])
    assert dtypes(os.path.join(run, "final")) == {"BF16"}  # as published
    assert json.load(open(os.path.join(run, "final", "config.json")))["dtype"] == "bfloat16"
    assert dtypes(os.path.join(rundir.checkpoints(run)[-1], "model")) == {"F32"}  # exact resume
    kept = str(tmp_path / "fp32")
    train.main(SFT + ["--model", base, "--steps", "1", "--final-dtype", "fp32", "--out", kept])
    assert dtypes(os.path.join(kept, "final")) == {"F32"}
    assert next(load_vlm(os.path.join(run, "final")).model.parameters()).dtype == torch.float32  # loads as trained


def test_adapters_name_their_base_by_an_absolute_path(tmp_path, monkeypatch, warm):
    monkeypatch.chdir(os.path.dirname(warm))
    run = str(tmp_path / "run")
    train.main(["--init", os.path.basename(warm), "--dataset", "synth:derm", "--steps", "1", "--batch-prompts", "2",
                "--group-size", "2", "--lora-rank", "2", "--eval-dataset", "none", "--threads", "1", "--out", run])
    base = lora.read_config(os.path.join(rundir.checkpoints(run)[-1], "model"))["base_model_name_or_path"]
    assert base == warm and os.path.isabs(base)


def test_eval_decodes_as_long_as_the_run_did(tmp_path):
    run = str(tmp_path / "run")
    train.main(SFT + ["--steps", "1", "--max-new-tokens", "7", "--out", run])
    vlm = load_vlm(os.path.join(run, "final"))
    assert vlm.model.config.medloc_max_new_tokens == 7
    import eval as ev
    import tasks
    from data import load_dataset
    preds = ev.predict(vlm, tasks.of_model(vlm), load_dataset("synth:derm", "test", n=2))
    assert all(len(vlm.processor.tokenizer(p["text"])["input_ids"]) <= 7 for p in preds)
