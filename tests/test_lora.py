"""LoRA by hand: identity at start, the reference is the model without adapters, only adapters
train, merging changes nothing, PEFT's file layout, and a LoRA run resumes exactly."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import grpo
import lora
import train
from model import load_vlm
from test_model import images
from test_train import read_log

QUERIES = ["Find it.", "Locate the bright opacity."]


@pytest.fixture
def setup():
    vlm = load_vlm("tiny")
    torch.manual_seed(0)
    r = grpo.sample_groups(vlm, images((200, 300), (380, 170)), QUERIES, 2, 1.0, 8)
    return vlm, r.batch, r.completion_ids, r.mask


def nudge(model, seed=1):
    """Give every adapter a non-zero B, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.layers(model):
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))


def test_fresh_adapters_change_nothing_and_only_they_train(setup):
    vlm, batch, ids, mask = setup
    before = vlm.completion_logps(batch, ids, 0.9, mask)
    names = lora.inject(vlm.model, rank=4, alpha=8)
    assert len(names) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    assert all(".language_model." in n for n in names)  # the vision tower is left alone
    assert torch.allclose(vlm.completion_logps(batch, ids, 0.9, mask), before, atol=1e-6)
    trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    vlm.completion_loss(batch, ids, lambda logp, start, stop: logp, 0.9, mask)[0].backward()
    assert all(p.grad is None for n, p in vlm.model.named_parameters() if n not in trainable)
    assert all(p.grad is not None for n, p in vlm.model.named_parameters() if n in trainable)


def test_the_reference_is_the_starting_model_without_a_second_copy(setup):
    vlm, batch, ids, mask = setup
    start = copy.deepcopy(vlm.model).eval()
    lora.inject(vlm.model, rank=4, alpha=8)
    nudge(vlm.model)
    ref = vlm.frozen_copy()
    assert ref.model is vlm.model  # same weights in memory
    with torch.no_grad():
        separate = copy.copy(vlm)
        separate.model = start
        expected = separate.completion_logps(batch, ids, 0.9, mask)
        assert torch.allclose(ref.completion_logps(batch, ids, 0.9, mask), expected, atol=1e-6)
        assert not torch.allclose(vlm.completion_logps(batch, ids, 0.9, mask), expected, atol=1e-3)


def test_merged_model_equals_the_adapted_one(setup):
    vlm, batch, ids, mask = setup
    lora.inject(vlm.model, rank=4, alpha=8)
    nudge(vlm.model)
    adapted = vlm.completion_logps(batch, ids, 0.9, mask).detach()
    lora.merge(vlm.model)
    assert not lora.layers(vlm.model)
    assert torch.allclose(vlm.completion_logps(batch, ids, 0.9, mask), adapted, atol=1e-5)


def test_adapters_are_saved_in_peft_layout_and_load_back(setup, tmp_path):
    vlm, batch, ids, mask = setup
    base = str(tmp_path / "base")
    vlm.save(base)
    lora.inject(vlm.model, rank=4, alpha=8)
    nudge(vlm.model)
    vlm.base_name = base
    vlm.save(str(tmp_path / "adapters"))
    config = json.load(open(tmp_path / "adapters" / "adapter_config.json"))
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8, base)
    keys = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight"].shape == (128, 4)
    again = load_vlm(str(tmp_path / "adapters"))  # the base named in adapter_config.json + the adapters
    assert torch.allclose(again.completion_logps(batch, ids, 0.9, mask), vlm.completion_logps(batch, ids, 0.9, mask),
                          atol=1e-6)


def test_a_lora_run_trains_adapters_resumes_exactly_and_ends_in_a_plain_model(warm, tmp_path):
    args = ["--init", warm, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4",
            "--eval-dataset", "none", "--reward", "iou", "--lora-rank", "4", "--save-every", "2", "--threads", "1"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(args + ["--steps", "4", "--out", whole])
    train.main(args + ["--steps", "2", "--out", split])
    ckpt = os.path.join(split, "checkpoint-000002", "model")
    assert os.path.exists(os.path.join(ckpt, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))  # adapters only
    train.main(["--resume", split, "--steps", "4"])
    drop = lambda log: [{k: v for k, v in r.items() if "seconds" not in k} for r in log]
    assert drop(read_log(split)) == drop(read_log(whole))
    assert read_log(whole)[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # adapters start at zero
    final = load_vlm(os.path.join(whole, "final"))
    assert not lora.layers(final.model)
    a, b = final.model.state_dict(), load_vlm(os.path.join(split, "final")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load_vlm(warm).model.state_dict().items())


def test_lora_targets_that_match_nothing_are_a_clear_error(warm, tmp_path):
    with pytest.raises(SystemExit, match="matches no linear layer"):
        train.main(["--init", warm, "--dataset", "synth:derm", "--eval-dataset", "none", "--lora-rank", "4",
                    "--lora-targets", "nothing", "--steps", "1", "--out", str(tmp_path / "r")])


def test_adapters_stay_float32_on_a_bf16_base(setup):
    vlm = load_vlm("tiny", precision="bf16")
    lora.inject(vlm.model, rank=4, alpha=8)
    (name, layer), = lora.layers(vlm.model)[:1]
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, layer.base.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").write_text("{bad"), "adapter_config.json: unreadable"),
    (lambda d: (d / "adapter_config.json").write_text('{"r": 4}'), "field 'lora_alpha' missing"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: unreadable"),
])
def test_a_damaged_adapter_folder_is_named_in_one_line(setup, tmp_path, damage, message):
    vlm = setup[0]
    vlm.save(str(tmp_path / "base"))
    lora.inject(vlm.model, rank=4, alpha=8)
    vlm.base_name = str(tmp_path / "base")
    folder = tmp_path / "adapters"
    vlm.save(str(folder))
    damage(folder)
    with pytest.raises(SystemExit, match=message):
        __import__("eval").main(["--model", str(folder), "--dataset", "synth:derm", "--n", "1"])
