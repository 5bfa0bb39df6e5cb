"""bench.py's memory plan against what a run on this CPU holds."""
import pytest
import torch

import bench
import measure
from config import Config
from model import load_vlm
from test_model import images


@pytest.mark.parametrize("model, size", [("tiny", None), ("proxy", dict(B=2, G=4, new=16, micro=4))])
def test_the_memory_plan_is_within_15_percent_of_a_measured_run(model, size):
    """Set-up and the second step's sampling, scoring and update phases of a real run (train.py's
    functions), peak resident memory per phase. The proxy's weights, reference, AdamW state and
    activations dominate, so its plan is checked alone; the tiny model's few megabytes are checked
    with the process they run in (the interpreter, torch and the data: most of what it holds)."""
    for phase, row in bench.check_plan(model, size).items():
        if model == "proxy":
            assert 0.85 < row["plan"] / row["measured"] < 1.15, (phase, row)
        assert 0.85 < (row["plan"] + row["base"]) / (row["measured"] + row["base"]) < 1.15, (phase, row)


def test_the_plan_follows_the_settings_as_the_accounting_says():
    """--fsdp K splits everything but the output layer; LoRA drops the reference and the full-size
    optimizer state; gradient checkpointing shrinks the activations."""
    model = measure.plan_model("3b")
    cfg = Config(batch_prompts=8, group_size=8, max_new_tokens=256, micro_batch=8)
    one = measure.memory_plan(model, cfg, 320, 256)
    four = measure.memory_plan(model, cfg, 320, 256, ranks=4, fsdp=True)
    head = model.lm_head.weight.numel() * 4
    whole = one["set-up"]["weights"]
    assert four["set-up"]["weights"] == pytest.approx((whole - head) / 4 + head)
    assert one["update"]["AdamW moments"] == 2 * whole and one["set-up"]["reference"] == whole
    assert four["sampling"]["gathered weights"] == pytest.approx((whole - head) / 2)  # bf16 copies of the body
    lora = measure.memory_plan(measure.plan_model("3b", 64), Config(**{**vars(cfg), "lora_rank": 64}), 320, 256)
    h, kv, m = 2048, 2 * 128, 11008  # Qwen2.5-VL-3B: q, k, v, o, gate, up, down in each of 36 layers
    adapters = 36 * 64 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + m) + (m + h))  # r x (in + out) each
    assert lora["set-up"]["reference"] == 0 and lora["update"]["AdamW moments"] == 2 * 4 * adapters
    saved = measure.memory_plan(model, Config(**{**vars(cfg), "gradient_checkpointing": True}), 320, 256)
    assert saved["scoring"]["activations"] < 0.1 * one["scoring"]["activations"]


def test_the_flop_formulas_count_the_matmuls_torch_counts():
    """step_flops without attention against torch's FlopCounterMode (which does not count the CPU's
    sdpa kernel) on the rollout, the scoring forward and its backward of the lean step."""
    from torch.utils.flop_counter import FlopCounterMode
    import grpo
    from test_model import images
    policy = measure.build("tiny", "cpu", "fp32")
    policy.eos_ids = policy.suppress_ids[:1].tolist()  # never sampled: every completion runs to T tokens
    B, G, T = 2, 4, 6
    pictures, prompts = images((200, 300), (200, 300)), ["find the lesion", "find it"]
    batch = policy.encode(pictures, prompts)
    image_tokens = int(batch["image_grid_thw"][0].prod()) // 4
    expected = measure.step_flops(policy.model.config, B, G, T, batch["input_ids"].shape[1], image_tokens,
                                attention=False)
    counted = {}
    with FlopCounterMode(display=False) as count:
        rollout = grpo.sample_groups(policy, pictures, prompts, G, 1.0, T)
    counted["rollout"] = count.get_total_flops()
    with FlopCounterMode(display=False) as count:
        loss, _ = policy.completion_loss(rollout.batch, rollout.completion_ids, lambda logp, start, stop: logp,
                                         1.0, rollout.mask)
    counted["policy_forward"] = count.get_total_flops()
    with FlopCounterMode(display=False) as count:
        loss.backward()
    counted["backward"] = count.get_total_flops()
    for phase, flops in counted.items():  # biases and the merger's norm are left out of the formulas
        assert flops == pytest.approx(expected[phase], rel=0.01), phase


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
def test_the_plans_kv_cache_is_the_cache_the_sampler_allocates(precision):
    """sampling_terms' KV cache against the static cache VLM.prefill allocates: the length rounded
    up to CACHE_BLOCK, and under bf16-mixed float32 keys beside bf16 values."""
    vlm = load_vlm("tiny", precision=precision)
    batch = vlm.encode(images((200, 300), (380, 170)), ["q", "a longer query"])
    state, _ = vlm.prefill(batch, 3, 20)
    held = sum(t.numel() * t.element_size() for layer in state["cache"].layers for t in (layer.keys, layer.values))
    cfg = Config(batch_prompts=2, group_size=3, max_new_tokens=20, precision=precision)
    plan = measure.memory_plan(measure.plan_model("tiny"), cfg, batch["input_ids"].shape[1], 16, device="cpu")
    assert plan["sampling"]["KV cache"] == held


def test_the_qwen3_vl_4b_plan_counts_its_heads_by_head_dim_and_its_patches_of_16():
    model = measure.plan_model("qwen3-vl-4b")
    assert model.config.model_type == "qwen3_vl" and model.config.vision_config.patch_size == 16
    cfg = Config(batch_prompts=4, group_size=8, max_new_tokens=256, micro_batch=8, precision="bf16-mixed")
    plan = measure.memory_plan(model, cfg, 320, 256)
    # 36 layers x 8 KV heads x head_dim 128 (not 2560 / 32 = 80) x (fp32 keys + bf16 values), 32 rows,
    # prompt + new tokens (576) rounded up to the cache block (640)
    assert plan["sampling"]["KV cache"] == 36 * 8 * 128 * (4 + 2) * 32 * 640
    assert plan["sampling"]["prompt pixels"] == 4 * (4 * 256) * (3 * 2 * 16 * 16) * 4  # patches of 16, not 14
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert plan["set-up"]["weights"] == 4 * params and 4.3e9 < params < 4.6e9  # Qwen3-VL-4B: 4.44 B


@pytest.mark.parametrize("shape, family", [("qwen3-clone", "qwen3_vl"), ("qwen3-moe-clone", "qwen3_vl_moe")])
def test_the_family_clones_are_built_with_their_own_processor(shape, family):
    """bench.py --model qwen3-clone --naive: the family's classes and its processor (patch 16, its
    pixel budget: at most 12 merged tokens of 2 x 2 patches, the aspect ratio kept)."""
    vlm = measure.build(shape, "cpu", "fp32", image_tokens=12)
    assert vlm.model.config.model_type == family and vlm.patch == 16
    batch = vlm.encode(images((300, 200), (90, 400)), ["q", "q"])
    grids = batch["image_grid_thw"]
    assert (grids.prod(-1) <= 4 * 12).all() and (grids[:, 1:] % 2 == 0).all()
    assert batch["pixel_values"].shape == (grids.prod(-1).sum(), 3 * 2 * 16 * 16)


def test_the_medgemma_4b_plan_counts_its_sliding_layers_cache_whole_and_its_896_pixel_images():
    """Gemma 3's shapes: 34 layers x 4 KV heads x head_dim 256, every layer's cache at full length
    (the sampler applies the sliding window by mask), pixel_values of one 896 x 896 image per prompt."""
    model = measure.plan_model("medgemma-4b")
    assert model.config.model_type == "gemma3" and model.config.text_config.layer_types.count("full_attention") == 6
    cfg = Config(batch_prompts=4, group_size=8, max_new_tokens=256, micro_batch=8, precision="bf16-mixed")
    plan = measure.memory_plan(model, cfg, 320, 256)
    assert plan["sampling"]["KV cache"] == 34 * 4 * 256 * (4 + 2) * 32 * 640
    assert plan["sampling"]["prompt pixels"] == 4 * 3 * 896 * 896 * 4
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert plan["set-up"]["weights"] == 4 * params and 4.2e9 < params < 4.4e9  # MedGemma 4B: 4.3 B
    assert plan["set-up"]["processor"] == 262_208 * measure.TOKENIZER_BYTES_PER_ENTRY


def test_the_gemma3_clone_steps_as_its_straightforward_path_does():
    """bench.py --model gemma3-clone --naive: Gemma 3's processor (every image 224 x 224, 16 image
    tokens) and the lean log-probs equal to measure.Naive's, the prompt longer than the window."""
    vlm = measure.build("gemma3-clone", "cpu", "fp32")
    batch = vlm.encode(images((300, 200), (90, 400)), ["q", "a much longer query " * 4])
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and (batch["token_type_ids"].sum(1) == 16).all()
    assert batch["input_ids"].shape[1] > vlm.window
    torch.manual_seed(0)
    ids = torch.randint(20, 100, (4, 9))
    lean = vlm.completion_logps(batch, ids, 0.9)
    assert torch.allclose(lean, measure.Naive.of(vlm).completion_logps(batch, ids, 0.9), atol=1e-5)


def test_image_tokens_of_a_fixed_size_family_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "gemma3-clone", "--image-tokens", "64"])
    assert capsys.readouterr().err.splitlines()[-1] == ("bench.py: error: --image-tokens: gemma3-clone resizes every "
                                                         "image to one size, and its config sets its 16 tokens")


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_the_qwen3_5_plan_holds_the_cache_of_its_full_layers_and_the_states_of_its_linear_ones(precision, tmp_path):
    """Qwen3.5's sampler keeps keys and values for its full-attention layers only, and per row a
    float32 recurrent state and the last conv inputs for each linear-attention layer (the prompts'
    own, before they are copied G times, beside them): the plan's terms against what it allocates."""
    from families import qwen3_5_folder
    from transformers.cache_utils import LinearAttentionLayer
    vlm = load_vlm(qwen3_5_folder(tmp_path / "q35"), precision=precision)
    batch = vlm.encode(images((200, 300), (380, 170)), ["q", "a longer query"])
    state, _ = vlm.prefill(batch, 3, 20)
    layers = state["cache"].layers
    kv = sum(t.numel() * t.element_size() for layer in layers if not isinstance(layer, LinearAttentionLayer)
             for t in (layer.keys, layer.values))
    states = sum(t.numel() * t.element_size() for layer in layers if isinstance(layer, LinearAttentionLayer)
                 for t in (layer.conv_states[0], layer.recurrent_states[0]))
    cfg = Config(batch_prompts=2, group_size=3, max_new_tokens=20, precision=precision)
    plan = measure.memory_plan(vlm.model, cfg, batch["input_ids"].shape[1], 16, device="cpu")
    assert plan["sampling"]["KV cache"] == kv and kv > 0
    assert plan["sampling"]["linear-attention states"] == states * (6 + 2) / 6  # 6 rows, and the 2 prompts'


def test_the_qwen3_5_9b_plan_counts_8_full_layers_and_its_248k_vocabulary():
    model = measure.plan_model("qwen3.5-9b")
    text = model.config.text_config
    assert model.config.model_type == "qwen3_5" and text.layer_types.count("full_attention") == 8
    cfg = Config(batch_prompts=4, group_size=8, max_new_tokens=256, micro_batch=8, precision="bf16-mixed")
    plan = measure.memory_plan(model, cfg, 320, 256)
    assert plan["sampling"]["KV cache"] == 8 * 4 * 256 * (4 + 2) * 32 * 640
    # 24 linear layers x (32 rows + 4 prompts) x (32 value heads x 128 x 128 float32, and the last 4 bf16
    # conv inputs of q, k (16 heads x 128 each) and v (32 x 128))
    assert plan["sampling"]["linear-attention states"] == 24 * 36 * (32 * 128 * 128 * 4 + (2 * 2048 + 4096) * 4 * 2)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert plan["set-up"]["weights"] == 4 * params and 9.3e9 < params < 9.5e9  # 9.41 B without the MTP layer
    assert model.lm_head.out_features == 248_320


def test_the_qwen3_5_clone_scores_as_its_straightforward_path_does():
    """bench.py --model qwen3.5-clone --naive: Qwen3-VL's processor (patch 16) around Qwen3.5's
    tokenizer class, the lean log-probs (a row per completion) equal to measure.Naive's full logits."""
    vlm = measure.build("qwen3.5-clone", "cpu", "fp32", image_tokens=12)
    assert vlm.model.config.model_type == "qwen3_5" and vlm.patch == 16 and vlm.family.recurrent
    batch = vlm.encode(images((300, 200), (90, 400)), ["q", "a much longer query " * 4])
    torch.manual_seed(0)
    ids = torch.randint(20, 100, (4, 9))
    lean = vlm.completion_logps(batch, ids, 0.9)
    assert torch.allclose(lean, measure.Naive.of(vlm).completion_logps(batch, ids, 0.9), atol=1e-5)


def test_the_smolvlm2_plan_counts_its_17_tiles_of_81_tokens_and_its_llama_cache():
    """SmolVLM2-2.2B: 24 layers x 32 KV heads x 64, an image of up to 1536 pixels a side as 4 x 4
    tiles of 384 x 384 and the whole image once more (17 tiles, 81 tokens each after the shuffle)."""
    model = measure.plan_model("smolvlm2-2.2b")
    assert model.config.model_type == "smolvlm" and measure.tile_tokens(model.config) == 81
    cfg = Config(batch_prompts=4, group_size=8, max_new_tokens=256, micro_batch=8, precision="bf16-mixed")
    plan = measure.memory_plan(model, cfg, 1377 + 64, 1377)
    assert plan["sampling"]["KV cache"] == 24 * 32 * 64 * (4 + 2) * 32 * 1792  # 1441 + 256 rounded up to 128s
    assert plan["sampling"]["prompt pixels"] == 4 * 17 * 3 * 384 * 384 * 4
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert plan["set-up"]["weights"] == 4 * params and 2.2e9 < params < 2.3e9  # SmolVLM2-2.2B: 2.25 B


def test_the_smolvlm_clone_scores_as_its_straightforward_path_does():
    """bench.py --model smolvlm-clone --naive: SmolVLM's processor (each image one 96 x 96 tile, 9
    tokens), the lean log-probs equal to measure.Naive's."""
    vlm = measure.build("smolvlm-clone", "cpu", "fp32")
    batch = vlm.encode(images((300, 200), (90, 400)), ["q", "a much longer query " * 4])
    assert batch["pixel_values"].shape == (2, 1, 3, 96, 96) and ((batch["input_ids"] == vlm.model.config.image_token_id)
                                                                  .sum(1) == 9).all()
    torch.manual_seed(0)
    ids = torch.randint(20, 100, (4, 9))
    lean = vlm.completion_logps(batch, ids, 0.9)
    assert torch.allclose(lean, measure.Naive.of(vlm).completion_logps(batch, ids, 0.9), atol=1e-5)


def test_planning_a_32b_model_holds_no_weight_under_a_5_gib_address_space_cap():
    """A job's memory cap (ulimit -v) below one weight of a 32B model's output layer (3 GiB in fp32)
    on top of torch itself: the plan is built without allocating a weight, and says why the model
    cannot fit here in one line."""
    import resource
    import subprocess
    import sys
    from conftest import ROOT

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2 ** 30, 5 * 2 ** 30))
    done = subprocess.run([sys.executable, "bench.py", "--model", "qwen3-vl-32b"], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=cap, timeout=300)
    said = (done.stdout + done.stderr).strip()
    assert done.returncode != 0 and "Traceback" not in said, said[-1500:]
    assert said.splitlines()[-1].startswith("bench.py --model qwen3-vl-32b: qwen3-vl-32b cannot fit on cpu: the memory "
                                            "plan's peak is ")


def test_a_model_built_on_meta_has_every_buffer_a_real_build_computes():
    """weights_on_meta: parameters of the real shapes on meta, buffers (rotary frequencies, Gemma's
    embedding scale) equal to those of an ordinary build, for every family's clone."""
    from model import FAMILIES, weights_on_meta
    for name in ("clone", "qwen3-clone", "qwen3-moe-clone", "qwen3.5-clone", "gemma3-clone", "smolvlm-clone"):
        config = measure.shape_config(name, measure.shape_tokenizer(name))
        real = FAMILIES[config.model_type].model(config)
        with weights_on_meta():
            meta = FAMILIES[config.model_type].model(config)
        assert [(k, p.shape) for k, p in real.named_parameters()] == [(k, p.shape) for k, p in meta.named_parameters()]
        assert all(p.is_meta for p in meta.parameters()), name
        buffers = dict(meta.named_buffers())
        assert buffers.keys() == dict(real.named_buffers()).keys() and buffers, name
        for k, b in real.named_buffers():
            assert not buffers[k].is_meta and torch.equal(buffers[k], b), (name, k)
