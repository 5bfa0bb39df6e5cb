"""The GPU check's command on this CPU (`bench.py --gpu-check --device cpu --quick`): every part
recorded with its numbers, the parts that need CUDA skipped saying so, a failing part recorded while
the others run; a shape whose memory plan cannot fit is one line before anything is built; a model
built on the meta device is materialised whole, its tied output layer still tied."""
import json
import subprocess
import sys

import pytest
import torch

import bench
import gpu_check
import measure
from model import build_tiny_tokenizer, weights_on_meta
from transformers import Qwen2_5_VLForConditionalGeneration
from conftest import ROOT


def test_the_quick_check_on_cpu_writes_every_part_with_its_numbers(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["stack", "cuda_tests", "default_run", "steps"] and report["device"] == "cpu"
    stack = parts["stack"]
    assert stack["status"] == "ok" and stack["torch"] == torch.__version__ and stack["matmul_tflops"] > 0
    assert 0 < stack["free_gib"] <= stack["memory_gib"]
    assert parts["cuda_tests"]["status"] == ("skipped: no CUDA" if not torch.cuda.is_available() else "skipped: --device cpu")
    run = parts["default_run"]
    assert run["status"] == "ok" and run["steps"] == 2 and run["finite"]
    assert run["kl_step1"] == 0.0  # bf16-mixed: the reference computes exactly what the policy does at step 1
    assert run["same_taus"] == (run["taus"] == run["cpu_taus"]) and len(run["cpu_taus"]) == 2
    row = parts["steps"]["rows"]["tiny eager"]
    assert row["status"] == "ok" and list(row["paths"]) == ["lean"]
    lean = row["paths"]["lean"]
    assert lean["total"] == pytest.approx(sum(lean[p] for p in measure.PHASES), rel=0.05)
    assert all(0 < lean["utilisation"][p]["utilisation"] < 1 for p in ("rollout", "reference", "backward", "step"))
    for phase in ("sampling", "scoring", "update"):
        m = row["memory_gib"][phase]
        assert m["measured_over_plan"] == pytest.approx(m["measured"] / m["plan"]) and m["plan"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| cuda_tests | skipped" in md and "| tiny eager | lean |" in md


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
    monkeypatch.setattr(gpu_check, "train_run", broken)
    monkeypatch.setattr(measure, "step_runs", broken)
    report = gpu_check.run_check(str(tmp_path), "cpu", quick=True)
    parts = report["parts"]
    assert parts["stack"]["status"] == "ok"
    assert parts["default_run"]["status"] == "failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert parts["steps"]["rows"]["tiny eager"]["status"].startswith("failed: RuntimeError: CUDA error")
    assert parts["steps"]["status"] == "failed: tiny eager" and "Traceback" in parts["default_run"]["traceback"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["stack"]["status"] == "ok"


def test_a_shape_that_cannot_fit_is_one_line_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "free_bytes", lambda device: 2 ** 20)  # 1 MiB free
    monkeypatch.setattr(measure, "step_runs", lambda *a, **k: pytest.fail("built a shape that cannot fit"))
    row = gpu_check.step_row("cpu", "tiny", "eager", 0, "auto", 2, 4, 8, 1, 0)
    plan = measure.step_plan("tiny", "cpu", "auto", 2, 4, 8, 16)
    peak = max(sum(t.values()) for t in plan.values())
    assert row == {"status": f"skipped: tiny cannot fit on cpu: the memory plan's peak is {peak / measure.GiB:.1f} GiB "
                             f"(scoring), 0.0 GiB is free"}
    done = subprocess.run([sys.executable, "bench.py", "--model", "7b"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr  # 7B needs far more than any CPU machine here
    assert done.stderr.strip().startswith("bench.py --model 7b: 7b cannot fit on cpu: the memory plan's peak is")


def test_a_model_built_on_meta_is_materialised_whole_and_still_tied():
    tok = build_tiny_tokenizer(vocab_size=151_936)
    with weights_on_meta():
        model = Qwen2_5_VLForConditionalGeneration(measure.shape_config("clone", tok))
    model = measure.materialised(model, "cpu", torch.bfloat16)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not any(p.is_meta for p in params.values()) and {p.dtype for p in params.values()} == {torch.bfloat16}
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the clone ties them, as the 3B does
    norms = [p for n, p in params.items() if "norm" in n and p.dim() == 1]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert all(p.std().item() == pytest.approx(0.02, rel=0.1) for n, p in params.items() if p.dim() == 2 and p.numel() > 10 ** 5)
    rotary = model.model.language_model.rotary_emb.inv_freq
    assert torch.isfinite(rotary).all() and rotary[0] == 1.0  # buffers computed at build, not left empty


def test_an_out_that_is_a_file_is_one_line_before_anything_runs(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        bench.main(["--gpu-check", "--device", "cpu", "--quick", "--out", str(tmp_path / "f")])
    assert f"--out {tmp_path / 'f'}: a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # under a file: not a traceback from makedirs
        bench.main(["--gpu-check", "--device", "cpu", "--quick", "--out", str(tmp_path / "f" / "check")])
    assert f"--out {tmp_path / 'f' / 'check'}: cannot create it" in capsys.readouterr().err
