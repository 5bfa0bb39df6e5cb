"""The GPU path on a GPU (marked `cuda`: skipped without one, run by `pytest -m cuda` and by
`bench.py --gpu-check`): a checkpoint written on CUDA resumes on CUDA and on the CPU, the bf16-mixed
reference's KL is exactly 0 at step 1, the sampler's static-cache decoding draws what transformers'
generate draws with its dynamic cache, and NCCL with one process ends where the plain run ends.
(The fused AdamW step on CUDA against its reference: tests/test_train.py, on both devices.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import grpo
import train
from conftest import ON_CUDA, ROOT
from model import load_vlm
from test_model import images

pytestmark = ON_CUDA
SFT = ["--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "4", "--eval-dataset", "none", "--threads", "1"]


def read_log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in f]


def final_weights(run):
    return load_vlm(os.path.join(run, "final")).model.state_dict()


def close(a, b, atol):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def test_a_checkpoint_written_on_cuda_resumes_on_cuda_and_on_the_cpu(tmp_path, capsys):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(SFT + ["--device", "cuda", "--steps", "4", "--out", whole])
    train.main(SFT + ["--device", "cuda", "--steps", "2", "--save-every", "1", "--out", split])
    on_cpu = str(tmp_path / "on-cpu")
    shutil.copytree(split, on_cpu)
    capsys.readouterr()
    train.main(["--resume", split, "--steps", "4", "--device", "cuda"])
    train.main(["--resume", on_cpu, "--steps", "4", "--device", "cpu"])
    assert capsys.readouterr().out.count("at step 2") == 2  # both from the newest checkpoint
    straight = final_weights(whole)
    # CUDA's embedding backward adds with atomics (sums in any order): close, not bit-equal
    assert close(final_weights(split), straight, 1e-5)
    assert close(final_weights(on_cpu), straight, 1e-3)  # other kernels for two steps of SFT
    for a, b in zip(read_log(split), read_log(whole)):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_the_bf16_mixed_reference_has_kl_exactly_0_at_step_1(tmp_path):
    run = str(tmp_path / "run")
    train.main(["--device", "cuda", "--precision", "bf16-mixed", "--steps", "1", "--batch-prompts", "2",
                "--group-size", "4", "--eval-dataset", "none", "--out", run])
    assert read_log(run)[0]["kl"] == 0.0


def test_static_cache_decoding_draws_what_generate_draws_with_its_dynamic_cache():
    vlm = load_vlm("tiny", "cuda", "fp32")
    pictures, queries = images((200, 300), (380, 170)), ["Find it.", "Locate the bright opacity in the upper lobe."]
    batch = vlm.encode(pictures, queries)
    ours = grpo.sample_groups(vlm, pictures, queries, 1, max_new_tokens=12, greedy=True)
    theirs = vlm.model.generate(**batch, do_sample=False, max_new_tokens=12, suppress_tokens=vlm.suppress_ids.tolist(),
                                eos_token_id=vlm.eos_ids, pad_token_id=vlm.pad_id)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, theirs[:, :ours.completion_ids.shape[1]])


def test_nccl_with_one_process_ends_where_the_plain_run_ends(tmp_path):
    """--fsdp joins the process group even alone (NCCL on CUDA): world size 1 is the plain run."""
    flags = SFT + ["--device", "cuda", "--precision", "fp32", "--steps", "3"]
    plain, nccl = str(tmp_path / "plain"), str(tmp_path / "nccl")
    train.main(flags + ["--out", plain])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "train.py", *flags, "--fsdp", "--out", nccl], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for a, b in zip(read_log(nccl), read_log(plain)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert close(final_weights(nccl), final_weights(plain), 1e-5)
