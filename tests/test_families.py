"""Each model family, exact on the lean paths (README, "Model families"): random-init tiny models
of the real transformers classes with their real processor classes (tests/families.py), checked
against each prompt scored ALONE (a batch of one, no padding, the model's own forward with every
input its processor returns), against transformers' generate, and through train.py and eval.py."""
import json

import pytest
import torch

import eval as ev
import grpo
import train
from families import gemma3_folder, qwen3_5_folder, qwen3_vl_folder, smolvlm_folder
from measure import GEMMA_VOCAB, QWEN3_5_VOCAB, SMOLVLM_VOCAB
from model import FAMILIES, load_vlm
from reward import from_image_frame, to_image_frame
from test_model import images, tiny_qwen2vl_folder

# very different sizes and lengths in one batch: heavy left padding, image grids of other shapes
PICTURES = [(60, 420), (500, 90), (230, 240)]
QUERIES = ["Find it.", "Where is the lesion?",
           "Locate the small, bright, round opacity in the upper part of the left lung, next to the rib, and "
           "answer with its box; ignore the other bright areas near the edges of the image."]
FAMILY_FOLDERS = {"qwen2_vl": tiny_qwen2vl_folder, "qwen3_vl": qwen3_vl_folder,
                  "qwen3_vl_moe": lambda path, **kw: qwen3_vl_folder(path, moe=True, **kw), "qwen3_5": qwen3_5_folder,
                  "gemma3": gemma3_folder, "smolvlm": smolvlm_folder}
REAL_VOCAB = {"gemma3": GEMMA_VOCAB, "qwen3_5": QWEN3_5_VOCAB, "smolvlm": SMOLVLM_VOCAB}  # Qwen's 151,936 otherwise


@pytest.fixture(scope="module", params=sorted(FAMILY_FOLDERS))
def family(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    FAMILY_FOLDERS[request.param](folder)
    return request.param, folder


def sampled(vlm, group_size=2, max_new_tokens=7, seed=0):
    """A rollout of the three prompts, each completion cut at its own end-of-turn position."""
    torch.manual_seed(seed)
    r = grpo.sample_groups(vlm, images(*PICTURES), QUERIES, group_size, 1.3, max_new_tokens)
    ids = r.completion_ids.clone()
    for i in range(ids.shape[0]):
        ids[i, 2 + i % (ids.shape[1] - 2):] = vlm.eos_ids[0]
    return r.batch, ids, grpo.completion_mask(ids, vlm.eos_ids)


def alone_logp(vlm, completion_ids, temperature):
    """log pi over the vocabulary (N, T, V) before each completion token, every prompt scored alone
    with the model's own forward: its own rotary positions, masks and token types from the
    processor's inputs (completion tokens are text, type 0), the logits at temperature T with the
    vision tokens removed."""
    G = completion_ids.shape[0] // len(QUERIES)
    out = []
    for i, (picture, query) in enumerate(zip(images(*PICTURES), QUERIES)):
        one = vlm.encode([picture], [query])
        L = one["input_ids"].shape[1]
        for ids in completion_ids[i * G:(i + 1) * G]:
            ids = ids[None]
            tail = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids),
                    "token_type_ids": torch.zeros_like(ids)}  # the completion: real text tokens
            inputs = {k: torch.cat([v, tail[k]], 1) if k in tail else v for k, v in one.items()}
            logits = vlm.model(**inputs, use_cache=False).logits[0, L - 1:-1].float() / temperature
            logits[:, vlm.suppress_ids] = float("-inf")
            out.append(logits.log_softmax(-1))
    return torch.stack(out)


def alone(vlm, completion_ids, temperature):
    """log pi of each completion token, every prompt scored alone (alone_logp)."""
    return alone_logp(vlm, completion_ids, temperature).gather(-1, completion_ids[..., None])[..., 0]


def test_the_families_table_names_each_family_once():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"} <= set(FAMILIES)
    assert FAMILIES["qwen3_vl"].coord == FAMILIES["qwen2_vl"].coord == "norm1000" and FAMILIES["qwen2_5_vl"].coord == "abs"


def test_lean_logps_and_gradients_equal_each_prompt_scored_alone(family):
    name, folder = family
    vlm = load_vlm(folder)
    batch, ids, mask = sampled(vlm)
    pads = (batch["attention_mask"] == 0).sum(1)
    assert pads.max() > 100 and pads.min() == 0  # heavy left padding in one batch
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    objective = lambda logp, start, stop: weights[mask.bool()][start:stop] * logp  # noqa: E731
    vlm.model.train()
    vlm.model.zero_grad(set_to_none=True)
    loss, lean = vlm.completion_loss(batch, ids, objective, 0.9, mask)
    loss.backward()
    lean_grads = {n: p.grad.clone() for n, p in vlm.model.named_parameters() if p.grad is not None}
    vlm.model.zero_grad(set_to_none=True)
    reference = alone(vlm, ids, 0.9)
    (reference * weights * mask).sum().backward()
    m = mask.bool()
    assert torch.allclose(lean[m], reference[m], atol=1e-5), (lean[m] - reference[m]).abs().max()
    grads = {n: p.grad for n, p in vlm.model.named_parameters() if p.grad is not None}
    vision = FAMILIES[name].vision[0]
    assert any(f".{vision}." in n for n in grads) and lean_grads.keys() == grads.keys()
    for n, g in grads.items():
        assert (lean_grads[n] - g).norm() <= 1e-5 * g.norm() + 1e-6, n
    assert torch.equal(vlm.completion_logps(batch, ids, 0.9, mask), lean.detach())


def test_greedy_sampling_is_transformers_generate_token_for_token(family):
    vlm = load_vlm(family[1])
    batch = vlm.encode(images(*PICTURES), QUERIES)
    ours = grpo.sample_groups(vlm, images(*PICTURES), QUERIES, 1, max_new_tokens=10, greedy=True).completion_ids
    theirs = vlm.model.generate(**batch, do_sample=False, max_new_tokens=10, suppress_tokens=vlm.suppress_ids.tolist(),
                                eos_token_id=vlm.eos_ids, pad_token_id=vlm.pad_id)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs[:, :ours.shape[1]])


def test_sampled_first_tokens_follow_the_softmax_at_the_temperature(family):
    vlm = load_vlm(family[1])
    logits = vlm.prefill(vlm.encode(images((200, 300)), ["q"]), 1, 1)[1][0]
    # a temperature that puts the top token 4 units above the median: a spread that other
    # temperatures change clearly (a random model's logits are small, and a tied one's favour the
    # last input token: scaling its weights would scale its inputs too)
    n, T = 4000, float(logits.max() - logits.median()) / 4
    torch.manual_seed(0)
    r = grpo.sample_groups(vlm, images((200, 300)), ["q"], n, T, max_new_tokens=1)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=vlm.model.lm_head.out_features).double()

    def max_z(temperature):  # the largest standardised gap between a count and its expectation
        p = vlm.policy_logprobs(logits, temperature).exp().double()
        return ((counts - n * p).abs() / (n * p * (1 - p) + 1).sqrt()).max().item()
    assert counts[vlm.suppress_ids].sum() == 0 and max_z(T) < 4.5  # 4.5 sigma: fails by chance with p < 1e-3
    assert max_z(1.5 * T) > 4.5 and max_z(T / 1.5) > 4.5  # the test can tell a wrong temperature


@pytest.mark.parametrize("size", [(37, 501), (640, 480), (1203, 88)])
def test_boxes_round_trip_through_the_frame_under_the_real_resize(family, size):
    vlm = load_vlm(family[1])
    batch = vlm.encode(images(size), ["q"])
    (w_in, h_in), = vlm.input_sizes(batch)
    if "image_grid_thw" in batch:
        t, h, w = batch["image_grid_thw"][0].tolist()
        assert batch["pixel_values"].shape == (t * h * w, 3 * 2 * vlm.patch ** 2)  # the processor's own patch: 14 or 16
        assert (w_in, h_in) == (w * vlm.patch, h * vlm.patch)
    elif "pixel_attention_mask" in batch:  # SmolVLM2: rows x cols tiles of S x S, then the whole image as one more
        S, tiles = batch["pixel_values"].shape[-1], batch["pixel_values"].shape[1]
        rows, cols = h_in // S, w_in // S
        assert (w_in, h_in) == (cols * S, rows * S) and tiles == (rows * cols + 1 if rows * cols > 1 else 1)
        assert (rows > cols) == (size[1] > 1.5 * size[0]) and (cols > rows) == (size[0] > 1.5 * size[1])
    else:  # Gemma 3: every image resized to the one size (no aspect kept)
        assert batch["pixel_values"].shape == (1, 3, h_in, w_in)
    W, H = size
    unit = (W / 1000, H / 1000) if vlm.coord == "norm1000" else (W / w_in, H / h_in)  # one step of the frame
    for box in ([0, 0, W, H], [3, 5, W // 2, H // 3], [W // 3, H // 4, W - 1, H - 2]):
        framed = from_image_frame(box, vlm.coord, (W, H), (w_in, h_in))
        assert to_image_frame(framed, vlm.coord, (W, H), (w_in, h_in)) == pytest.approx(box, abs=1e-9)
        written = [round(v) for v in framed]  # what a model writes: whole numbers of its frame
        back = to_image_frame(written, vlm.coord, (W, H), (w_in, h_in))
        assert all(abs(a - b) <= unit[k % 2] / 2 + 1e-9 for k, (a, b) in enumerate(zip(back, box)))


def test_several_boxes_go_to_the_frame_and_back_under_the_real_resize(family):
    """MultiGrounding's SFT answer (every box in the family's frame, whole numbers) read back by its
    parser and matched to the truth: each box within half a frame step of its own, none swapped."""
    import tasks
    from data import Sample
    vlm = load_vlm(family[1])
    W, H = 1203, 588
    batch = vlm.encode(images((W, H)), ["q"])
    (size,) = vlm.input_sizes(batch)
    truth = ((3, 5, 300, 200), (640, 10, 1200, 580), (310, 300, 620, 587))
    sample = Sample(None, "q", None, (W, H), "x", boxes=truth)
    task = tasks.MultiGrounding("r1", vlm.coord)
    pred = task.predict(task.sft_answer(sample, 0, size), sample, size)
    unit = (W / 1000, H / 1000) if vlm.coord == "norm1000" else (W / size[0], H / size[1])
    for got, want in zip(pred["boxes"], truth, strict=True):
        assert all(abs(a - b) <= unit[k % 2] / 2 + 1e-9 for k, (a, b) in enumerate(zip(got, want)))
    assert pred["f1@0.8"] == 1.0 and len(pred["matched"]) == 3


def test_two_grpo_steps_resume_bit_identical_and_eval_reads_the_frame(family, tmp_path):
    name, folder = family
    common = ["--model", folder, "--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "3",
              "--max-new-tokens", "8", "--eval-dataset", "none", "--threads", "1", "--save-every", "1", "--lr", "1e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(common + ["--steps", "2", "--out", str(straight)])
    train.main(common + ["--steps", "1", "--out", str(resumed)])
    train.main(["--resume", str(resumed), "--steps", "2"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if "seconds" not in k} for l in open(p)]  # noqa: E731
    assert strip(straight / "metrics.jsonl") == strip(resumed / "metrics.jsonl") and len(strip(resumed / "metrics.jsonl")) == 2
    assert (straight / "final" / "model.safetensors").read_bytes() == (resumed / "final" / "model.safetensors").read_bytes()
    assert json.loads((straight / "final" / "config.json").read_text())["model_type"] == name
    ev.main(["--model", str(straight / "final"), "--dataset", "synth:derm", "--n", "4", "--out", str(tmp_path / "e.json"),
             "--max-new-tokens", "8"])
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["n"] == 4 and 0 <= metrics["mIoU"] <= 1


def test_fsdp_over_two_processes_trains_as_one_process_does(family, tmp_path):
    """SFT (a random model's GRPO rewards are all 0, so its gradients are too): the family's decoder
    layers and vision blocks as FSDP's units, gloo, against one process: Gemma 3, whose masks and
    checkpoint names differ, and Qwen3.5, whose linear layers hold parameters no other family has and
    whose weight files hold a layer the model has not (the other families: tests/test_dist.py with
    the tiny Qwen2.5-VL, and each one's unit classes in
    test_fsdp_units_are_every_decoder_layer_and_vision_block)."""
    if family[0] not in ("gemma3", "qwen3_5"):  # the suite's time is finite
        pytest.skip("this family's sharding path is Qwen2.5-VL's (tests/test_dist.py) with its own unit classes: "
                    "test_fsdp_units_are_every_decoder_layer_and_vision_block")
    from test_dist import torchrun
    args = ["train.py", "--model", family[1], "--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "4",
            "--steps", "2", "--lr", "1e-3", "--eval-dataset", "none", "--threads", "1", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(args[1:] + ["--out", str(one)])
    torchrun(args + ["--fsdp", "--out", str(two)])
    for a, b in zip(*(map(json.loads, open(run / "metrics.jsonl")) for run in (one, two)), strict=True):
        assert a["loss"] > 0 and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    x, y = (load_vlm(str(run / "final")).model.state_dict() for run in (one, two))
    # Adam's first steps move every weight by about lr = 1e-3 whatever its gradient's size: a
    # gradient summed in another order may move one weight 2e-6 differently (seen: Gemma 3)
    assert all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


def test_fsdp_units_are_every_decoder_layer_and_vision_block(family):
    """The family's unit class names (FAMILIES[...].units) find each decoder layer and each block of
    its vision tower, in order: FSDP splits the model unit by unit (dist.shard)."""
    from model import fsdp_units
    model = load_vlm(family[1]).model
    layers = list(getattr(model.model, FAMILIES[family[0]].text).layers)
    vision = model.config.vision_config
    depth = getattr(vision, "depth", None) or vision.num_hidden_layers  # Qwen's blocks, SigLIP's layers
    units = fsdp_units(model)
    assert units[:len(layers)] == layers and len(units) == len(layers) + depth
    tower = getattr(model.model, FAMILIES[family[0]].vision[0])
    assert all(any(unit is m for m in tower.modules()) for unit in units[len(layers):])


def test_lora_adapts_the_attention_and_dense_mlp_layers_and_loads_back_in_peft_layout(family, tmp_path):
    import lora
    from safetensors.torch import load_file
    name, folder = family
    vlm = load_vlm(folder)
    batch, ids, mask = sampled(vlm)
    wrapped = lora.inject(vlm.model, rank=4, alpha=8)
    text = vlm.model.config.get_text_config()
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    dense = FAMILIES[name].model.__name__ != "Qwen3VLMoeForConditionalGeneration"
    # q, k, v, o, or a linear-attention layer's qkv, z, out (+ gate, up, down); a MoE's experts are no nn.Linear
    assert len(wrapped) == sum((3 if kind == "linear_attention" else 4) + 3 * dense for kind in kinds)
    assert not any("experts" in n or n.endswith("mlp.gate") for n in wrapped)
    with torch.no_grad():
        for module in vlm.model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.weight.normal_(0, 0.1)
    vlm.base_name = folder
    vlm.save(str(tmp_path / "adapters"))
    keys = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    attention, text = next(i for i, kind in enumerate(kinds) if kind != "linear_attention"), FAMILIES[name].text
    assert f"base_model.model.model.{text}.layers.{attention}.self_attn.q_proj.lora_A.weight" in keys
    if "linear_attention" in kinds:
        assert "base_model.model.model.language_model.layers.0.linear_attn.in_proj_qkv.lora_A.weight" in keys
    again = load_vlm(str(tmp_path / "adapters"))
    assert torch.allclose(again.completion_logps(batch, ids, 0.9, mask), vlm.completion_logps(batch, ids, 0.9, mask),
                          atol=1e-6)


def test_the_real_vocabulary_scores_as_each_prompt_alone(family, tmp_path):
    """The same family with its real vocabulary (Qwen's 151,936, Gemma 3's 262,208): chunked output
    layer, suppressed vision tokens."""
    name, _ = family
    vocab = REAL_VOCAB.get(name, 151_936)
    folder = FAMILY_FOLDERS[name](str(tmp_path / "real-vocab"), vocab_size=vocab)
    vlm = load_vlm(folder)
    assert vlm.model.lm_head.out_features == vocab
    batch, ids, mask = sampled(vlm, max_new_tokens=5)
    m = mask.bool()
    assert torch.allclose(vlm.completion_logps(batch, ids, 0.9, mask)[m], alone(vlm, ids, 0.9)[m], atol=1e-5)


@pytest.mark.parametrize("model_type", ["idefics3", "qwen3_5_moe", "llava"])
def test_a_family_not_trained_here_is_one_line_naming_those_that_are_before_anything_loads(model_type, tmp_path):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(folder), "--dataset", "synth:derm", "--out", str(tmp_path / "run")])
    assert str(e.value) == (f"error: --model {folder}: model type {model_type!r} is not supported; the families trained "
                            f"here: {', '.join(sorted(FAMILIES))} (README, Model families)")
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_softcapped_gemma_or_one_cropping_its_images_is_one_line_before_its_weights_load(tmp_path):
    """Gemma 3's options that the lean paths do not serve: a softcapped output layer (config.json),
    pan-and-scan crops (several images a prompt; preprocessor_config.json)."""
    folder = gemma3_folder(tmp_path / "capped")
    config = json.loads((tmp_path / "capped" / "config.json").read_text())
    config["text_config"]["final_logit_softcapping"] = 30.0
    (tmp_path / "capped" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", folder, "--dataset", "synth:derm", "--out", str(tmp_path / "run")])
    assert str(e.value) == (f"error: --model {folder}: final_logit_softcapping 30.0 is not supported by the "
                            "hand-written output layer (METHOD.md 5.5)")
    folder = gemma3_folder(tmp_path / "crops")
    images = json.loads((tmp_path / "crops" / "processor_config.json").read_text())
    images["image_processor"]["do_pan_and_scan"] = True
    (tmp_path / "crops" / "processor_config.json").write_text(json.dumps(images))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", folder, "--dataset", "synth:derm", "--out", str(tmp_path / "run")])
    assert "do_pan_and_scan is on" in str(e.value) and "\n" not in str(e.value)


def test_the_logged_entropy_is_that_of_whole_logits_at_every_drawn_token(family):
    """METHOD.md 5.1: H(pi) at each sampled position, from the sampler's own step logits, equals the
    entropy of the whole teacher-forced logits at temperature T (vision tokens removed)."""
    vlm = load_vlm(family[1])
    torch.manual_seed(3)
    r = grpo.sample_groups(vlm, images(*PICTURES), QUERIES, 2, 1.3, 6)
    logp = alone_logp(vlm, r.completion_ids, 1.3)
    reference = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    m = r.mask.bool()
    assert torch.allclose(r.entropy[m], reference[m], atol=1e-5) and (r.entropy[~m] == 0).all()
    assert r.entropy[m].min() > 0  # a random model's distribution is far from a point mass


def test_batches_put_together_are_the_processors_batch_of_all_their_prompts(family):
    """What dynamic sampling's extra rounds are merged with (VLM.concat_batches): the processor's
    own batch of every prompt, its padding included (SmolVLM2's missing tiles all zero)."""
    from model import VLM
    vlm, pictures = load_vlm(family[1]), images(*PICTURES)
    whole = vlm.encode(pictures, QUERIES)
    parts = VLM.concat_batches([vlm.encode(pictures[:1], QUERIES[:1]), vlm.encode(pictures[1:], QUERIES[1:])],
                               vlm.pad_id)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
