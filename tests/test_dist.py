"""Data parallel under torchrun (2 CPU processes, gloo) computes what one process computes."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import eval as ev
import measure
import tasks
from data import load_dataset
from model import load_vlm
from test_train import read_log

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def torchrun(args, processes=2):
    with socket.socket() as s:  # a free local port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_addr=127.0.0.1", f"--master_port={port}", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_update_the_weights_as_one_and_share_one_curriculum(tmp_path):
    """Replicated (data parallel) and sharded (FSDP2) alike."""
    one, two, sharded = tmp_path / "one", tmp_path / "two", tmp_path / "sharded"
    one.mkdir(), two.mkdir(), sharded.mkdir()
    subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), str(one)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    torchrun([os.path.join(HERE, "dist_worker.py"), str(two)])
    torchrun([os.path.join(HERE, "dist_worker.py"), str(sharded), "--fsdp"])
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        a = torch.load(one / f"{loss_type}.pt")
        for other in (two, sharded):
            b = torch.load(other / f"{loss_type}.pt")
            assert a.keys() == b.keys()
            for name in a:
                assert torch.allclose(a[name], b[name], atol=1e-6), (other.name, loss_type, name)
    traces = [json.loads((d / f"taus-{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))]
    assert traces[0] == traces[1] == traces[2] and traces[0][-1] > traces[0][0]
    # a sharded rollout inside dist.gathered draws the same tokens with one gather per unit, not one per token
    counts = json.loads((sharded / "gathers.json").read_text())
    assert counts["gathered"]["ids"] == counts["plain"]["ids"] and len(counts["plain"]["ids"][0]) == 10
    units = 4 + 2 + 1  # text layers, vision blocks, the body (FSDP's root, often still gathered)
    assert 4 <= counts["gathered"]["gathers"] <= units < 9 * 4 <= counts["plain"]["gathers"]  # 9 decode steps x 4 layers


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_loading(tmp_path, monkeypatch):
    import train
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun tells each process
    with pytest.raises(SystemExit, match="--batch-prompts 3 does not split over 2 processes"):
        train.main(["--batch-prompts", "3", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # refused before anything is made


def test_a_sharded_run_matches_the_replicated_one_resumes_and_evaluates_as_one_process(warm, tmp_path):
    """--fsdp: the same metrics as data parallel (AdamW, clipping, micro-batches), checkpoints that
    resume sharded, and an evaluation over both ranks equal to a one-process one of final/."""
    args = ["train.py", "--init", warm, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4",
            "--micro-batch", "4", "--grad-clip", "0.5", "--reward", "iou", "--save-every", "2", "--sft-steps", "3",
            "--eval-dataset", "synth:derm", "--eval-n", "4", "--threads", "1", "--device", "cpu"]
    replicated, sharded = str(tmp_path / "replicated"), str(tmp_path / "sharded")
    torchrun(args + ["--steps", "4", "--out", replicated])
    torchrun(args + ["--steps", "2", "--out", sharded, "--fsdp"])
    torchrun(["train.py", "--resume", sharded, "--steps", "4", "--fsdp"])
    for a, b in zip(read_log(replicated), read_log(sharded), strict=True):
        for key in a:
            if "seconds" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    final = load_vlm(os.path.join(sharded, "final"))
    other = load_vlm(os.path.join(replicated, "final")).model.state_dict()
    for name, w in final.model.state_dict().items():
        assert torch.allclose(w, other[name], atol=1e-5), name
    metrics, _ = ev.evaluate(final, tasks.of_model(final), load_dataset("synth:derm", "test", n=4), max_new_tokens=24)
    with open(os.path.join(sharded, "eval.json")) as f:
        assert json.load(f)["mIoU"] == pytest.approx(metrics["mIoU"])


def test_a_run_resumes_on_another_number_of_processes_and_back(warm, tmp_path):
    """A one-process checkpoint resumed by 2 processes, split (--fsdp: its AdamW state split as the
    weights are) or replicated, which then agree step for step; and a split 2-process checkpoint
    resumed by one process. Each keeps the log up to its checkpoint and carries on AdamW's state."""
    args = ["train.py", "--init", warm, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4",
            "--eval-dataset", "none", "--reward", "iou", "--save-every", "2", "--threads", "1", "--device", "cpu"]
    one = tmp_path / "one"
    subprocess.run([sys.executable, *args, "--steps", "2", "--out", str(one)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    split, replicated = tmp_path / "split", tmp_path / "replicated"
    for copy in (split, replicated):
        shutil.copytree(one, copy)
    torchrun(["train.py", "--resume", str(split), "--steps", "4", "--fsdp"])
    torchrun(["train.py", "--resume", str(replicated), "--steps", "4"])
    back = tmp_path / "back"
    torchrun(args + ["--steps", "2", "--out", str(back), "--fsdp"])
    subprocess.run([sys.executable, "train.py", "--resume", str(back), "--steps", "4"], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    before = read_log(one)
    for run in (split, replicated, back):
        log = read_log(run)
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        if run != back:
            assert log[:2] == before
        state = torch.load(run / "checkpoint-000004" / "trainer_state.pt", weights_only=True)
        shapes = dict(load_vlm(str(run / "final")).model.named_parameters())
        moments = list(state["optimizer"]["state"].values())
        assert all(s["step"].item() == 4 for s in moments)  # two steps before the resume, two after
        assert sorted(s["exp_avg"].shape for s in moments) == sorted(p.shape for p in shapes.values())
    for a, b in zip(read_log(split)[2:], read_log(replicated)[2:]):
        for key in a:
            if "seconds" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """measure.py's proxy model saved as a folder: Qwen2.5-VL, real 151,936 vocabulary, 430 MB in fp32."""
    folder = str(tmp_path_factory.mktemp("proxy") / "model")
    measure.build("proxy", "cpu", "fp32").save(folder)
    return folder


def test_a_sharded_load_never_holds_the_whole_model_and_loads_its_weights_exactly(proxy, tmp_path):
    """--fsdp builds the model without weights, splits it, then reads each rank's rows from the
    file: 2 processes each peak below one whole model (the old way, loading whole and then
    splitting, peaked above it), at what they keep plus a little, with the weights from_pretrained reads."""
    torchrun([os.path.join(HERE, "dist_worker.py"), str(tmp_path), "--setup", proxy])
    whole = load_vlm(proxy).model
    expected = whole.state_dict()
    weights = torch.load(tmp_path / "weights.pt")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    for rank in (0, 1):
        memory = json.loads((tmp_path / f"memory-{rank}.json").read_text())
        assert memory["kept"] < memory["grown"] < 1.05 * memory["kept"] < whole_bytes, memory


def test_fsdp_outside_torchrun_or_with_lora_is_refused_in_one_line(tmp_path, monkeypatch):
    import train
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        train.main(["--fsdp", "--lora-rank", "4", "--out", str(tmp_path / "r")])
    message = str(e.value.code)
    assert "--fsdp splits the model over torchrun's processes" in message and "--fsdp with --lora-rank" in message
    assert not (tmp_path / "r").exists()  # before anything is made


def test_a_sharding_or_a_restart_that_cannot_work_is_refused_in_one_line(tmp_path, monkeypatch):
    import train
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    for argv, words in ((["--fsdp", "banana"], "--fsdp banana: --fsdp alone (split over every process) or --fsdp hybrid"),
                        (["--fsdp", "hybrid", "--shard-size", "3"], "--shard-size 3: with --fsdp hybrid, a divisor of the 4"),
                        (["--shard-size", "2"], "--shard-size 2: with --fsdp hybrid"),
                        (["--dist-timeout", "5"], "--dist-timeout 5: must be [10, 604800]"),
                        ([], "torchrun --max-restarts needs --out RUN")):
        with pytest.raises(SystemExit) as e:
            train.main(argv + (["--out", str(tmp_path / "r")] if argv else []))
        assert words in str(e.value.code)
    assert not (tmp_path / "r").exists()
