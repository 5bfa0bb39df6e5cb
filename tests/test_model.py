import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers import Qwen2VLVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from data import load_dataset
from grpo import sample_groups
from model import (PATCH, TINY_CHAT_TEMPLATE, TINY_WARM_START, VLM, build_tiny_tokenizer, load_vlm)
from reward import from_image_frame, score_completions


def images(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def tiny():
    return load_vlm("tiny")


def test_tiny_tokenizer_round_trips_answers_and_knows_template_words():
    tok = build_tiny_tokenizer()
    text = "<answer>[12,34,56,78]</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 + len("[12,34,56,78]")  # <answer> and </answer> are one token each
    assert tok.decode(ids) == text


def test_input_sizes_follow_the_processor_resize(tiny):
    batch = tiny.encode(images((300, 200), (160, 390)), ["a", "b"])
    expected = [smart_resize(h, w, 28, 56 * 56, 112 * 112)[::-1] for w, h in ((300, 200), (160, 390))]
    assert tiny.input_sizes(batch) == [tuple(e) for e in expected]
    n_pad = (batch["input_ids"] == tiny.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(1)
    assert n_pad.tolist() == [w * h // (PATCH * PATCH * 4) for w, h in expected]


def test_logps_are_the_same_alone_or_left_padded_in_a_batch(tiny):
    imgs, queries = images((200, 300), (380, 170)), ["Find it.", "Locate the bright opacity."]
    batch = tiny.encode(imgs, queries)
    ids = torch.tensor([[40, 41, 42, 2], [43, 44, 2, 0]])
    together = tiny.completion_logps(batch, ids)
    for i in range(2):
        alone = tiny.completion_logps(tiny.encode(imgs[i:i + 1], queries[i:i + 1]), ids[i:i + 1])
        assert torch.allclose(alone, together[i:i + 1], atol=1e-5)


def test_sampling_never_emits_vision_tokens_and_masks_up_to_the_first_stop(tiny):
    torch.manual_seed(0)
    r = sample_groups(tiny, images((200, 300), (380, 170)), ["a", "b"], group_size=4, temperature=1.5,
                      max_new_tokens=30)
    assert r.completion_ids.shape[0] == 8 and r.batch["input_ids"].shape[0] == 2  # prompts once
    assert not torch.isin(r.completion_ids, tiny.suppress_ids).any()
    for ids, mask in zip(r.completion_ids.tolist(), r.mask.tolist()):
        stops = [t for t, token in enumerate(ids) if token in tiny.eos_ids]
        length = stops[0] + 1 if stops else len(ids)  # the first stop token is scored, nothing after it
        assert mask == [1.0] * length + [0.0] * (len(ids) - length)
    assert (r.logps[r.mask == 0] == 0).all() and (r.logps[r.mask == 1] < 0).all()


def test_groups_are_contiguous_rows_of_their_prompt():
    """Rows g*G .. g*G + G-1 are prompt g's: greedy, they all equal prompt g decoded alone."""
    vlm = load_vlm(TINY_WARM_START)  # the shipped warm start: its answers differ from image to image
    alone = {}  # two images whose greedy answers differ, else the check below could not fail
    for s in load_dataset("synth:derm", "test", n=12):
        ids = sample_groups(vlm, [s.image()], [s.query], 1, max_new_tokens=24, greedy=True).completion_ids[0]
        alone.setdefault(tuple(ids.tolist()), (s, ids))
        if len(alone) == 2:
            break
    chosen = list(alone.values())[:2]
    assert len(chosen) == 2
    pictures, prompts = [s.image() for s, _ in chosen], [s.query for s, _ in chosen]
    together = sample_groups(vlm, pictures, prompts, group_size=3, max_new_tokens=24, greedy=True).completion_ids
    for g, (_, expected) in enumerate(chosen):
        for row in together[3 * g:3 * g + 3]:
            T = len(expected)
            assert torch.equal(row[:T], expected) and (row[T:] == vlm.pad_id).all()


def test_select_rows_slices_pixels_per_image(tiny):
    batch = tiny.encode(images((200, 300), (380, 170), (160, 160)), ["a", "b", "c"])
    ids = torch.tensor([[40, 2]] * 3)
    whole = tiny.completion_logps(batch, ids)
    part = tiny.completion_logps(VLM.select_rows(batch, 1, 3), ids[1:])
    assert torch.allclose(whole[1:], part, atol=1e-5)


def test_saved_tiny_model_reloads_with_identical_greedy_outputs(tiny, tmp_path):
    tiny.save(str(tmp_path / "ck"))
    again = load_vlm(str(tmp_path / "ck"))
    assert (again.is_tiny, again.template, again.coord) == (True, "short", "abs")
    greedy = lambda vlm: sample_groups(vlm, images((250, 180)), ["q"], 1, max_new_tokens=10, greedy=True)
    assert torch.equal(greedy(tiny).completion_ids, greedy(again).completion_ids)
    for (name, p), q in zip(tiny.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_real_processor_reward_on_large_non_square_image():
    # the Qwen2.5-VL processor with a common pixel budget downsizes a 2400x1500 image
    tok = build_tiny_tokenizer()
    from transformers import Qwen2_5_VLProcessor
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=1003520),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=TINY_CHAT_TEMPLATE)
    vlm = VLM(load_vlm("tiny").model, processor, template="r1")
    batch = vlm.encode(images((2400, 1500)), ["Locate the lesion."])
    (w_in, h_in), = vlm.input_sizes(batch)
    assert (h_in, w_in) == smart_resize(1500, 2400, 28, 3136, 1003520) and w_in < 2400
    gt = (600.0, 300.0, 1500.0, 1200.0)
    x1, y1, x2, y2 = from_image_frame(gt, "abs", (2400, 1500), (w_in, h_in))
    text = f'<think>ok</think><answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>'
    s = score_completions([text], [gt], [(2400, 1500)], [(w_in, h_in)], vlm.coord, 0.8, template="r1")
    assert s["iou"].item() == pytest.approx(1.0) and s["reward"].item() == 2.0
    # the same text read as if no rescale happened would miss badly
    unscaled = score_completions([text], [gt], [(2400, 1500)], [(2400, 1500)], vlm.coord, 0.8, template="r1")
    assert unscaled["iou"].item() < 0.5


def tiny_qwen2vl_folder(path, vocab_size=None):
    """A random-init Qwen2-VL (the other supported family) saved like a hub checkpoint."""
    tok = build_tiny_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE).save_pretrained(path)
    return str(path)


def test_qwen2_vl_folder_loads_with_the_norm1000_frame(tmp_path):
    tiny_qwen2vl_folder(str(tmp_path))
    vlm = load_vlm(str(tmp_path), max_pixels=6272)
    assert (vlm.coord, vlm.template, vlm.is_tiny) == ("norm1000", "r1", False)
    batch = vlm.encode(images((300, 200)), ["q"])
    assert vlm.input_sizes(batch)[0][0] * vlm.input_sizes(batch)[0][1] <= 6272  # --max-pixels applied
    r = sample_groups(vlm, images((300, 200)), ["q"], 2, max_new_tokens=4)
    assert vlm.completion_logps(r.batch, r.completion_ids).shape == r.completion_ids.shape == (2, 4)


def test_unknown_model_family_is_refused(tiny):
    model = tiny.model
    model.config.model_type = "llava"
    try:
        with pytest.raises(ValueError, match="model type .llava. is not supported; the families trained here"):
            VLM(model, tiny.processor)
    finally:
        model.config.model_type = "qwen2_5_vl"


def test_bf16_mixed_keeps_fp32_weights_and_a_reference_that_computes_the_same_function():
    # the CUDA default, exercised with CPU autocast: fp32 master weights, bf16 matmuls
    mixed = load_vlm("tiny", precision="bf16-mixed")
    plain = load_vlm("tiny")
    assert next(mixed.model.parameters()).dtype == torch.float32
    batch = plain.encode(images((200, 300), (380, 170)), ["q", "qq"])
    ids = torch.tensor([[40, 41, 2], [43, 2, 0]])
    assert torch.allclose(mixed.completion_logps(batch, ids), plain.completion_logps(batch, ids), atol=0.05)
    ref = mixed.frozen_copy()
    assert next(ref.model.parameters()).dtype == torch.float32 and ref.amp_dtype == torch.bfloat16
    # policy == reference: the KL is exactly 0, not bf16 noise (a bf16 copy differed by up to 0.12 nats)
    assert torch.equal(ref.completion_logps(batch, ids, 0.9), mixed.completion_logps(batch, ids, 0.9))
    assert mixed.completion_logps(batch, ids).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        load_vlm("tiny", precision="fp8")


def test_the_sharded_loader_reads_a_weight_file_row_by_row_and_refuses_a_truncated_one(tmp_path):
    """model.read_safetensors (what --fsdp loads with) gives safetensors' own tensors, any rows of
    them, and says a file is cut short before anything is read: every rank then stops alike."""
    from safetensors.torch import load_file, save_file
    import model
    weights = {"a": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "s": torch.tensor(2.5)}
    path = str(tmp_path / "w.safetensors")
    save_file(weights, path)
    expected = load_file(path)
    with open(path, "rb") as f:
        data = f.read()
    seen = []
    for name, shape, fetch in model.read_safetensors(path):
        seen.append(name)
        assert list(shape) == list(expected[name].shape)
        assert torch.equal(fetch(), expected[name]) and fetch().dtype == expected[name].dtype
        if name == "a":
            assert torch.equal(fetch(1, 4), expected["a"][1:4])
    assert sorted(seen) == sorted(weights)
    with open(path, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(ValueError, match=r"w.safetensors: truncated \(\d+ bytes; its header describes \d+\)"):
        next(model.read_safetensors(path))


def test_freed_logit_chunks_are_reused_instead_of_mapped_afresh():
    """model.reuse_freed_memory: 64 MB tensors (logit chunks) made and freed in turn reuse freed
    pages once the heap has settled; without it every one of their 16,384 pages faults each time.
    Settling takes a few rounds: torch asks for 64-byte-aligned blocks, which a freed block of
    exactly the same size cannot hold until it has merged with a neighbour (seen: 1 to 3 rounds
    under torch 2.14, 7 under 2.11): the last 5 of 20 rounds are counted.
    In fresh processes: the setting is the process's."""
    probe = ("import resource, sys, torch, model\n"
             "if sys.argv[1] == 'reuse': model.reuse_freed_memory()\n"
             "for _ in range(20):\n"
             "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    x = torch.ones(2 ** 24); del x\n"
             "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {how: [int(n) for n in subprocess.run([sys.executable, "-c", probe, how], cwd=root, capture_output=True,
                                                    text=True, check=True).stdout.split()[-5:]]
              for how in ("default", "reuse")}
    assert min(faults["default"]) >= 2 ** 24 * 4 // 4096 * 0.9 and sum(faults["reuse"]) < 1000, faults
