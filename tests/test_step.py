"""The lean GRPO step computes what the straightforward one does (METHOD.md section 5).

Shared-prefix log-probs and gradients against G separate forwards, the hand-written sampler against
transformers' generate and against the softmax it claims to draw from, and the memory of scoring
with a 151,936-token vocabulary.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grpo
from bench import Naive
from model import VLM, build_tiny_model, build_tiny_processor, build_tiny_tokenizer, load_vlm
from test_model import images, tiny, tiny_qwen2vl_folder  # noqa: F401  (tiny: a fixture)

QUERIES = ["Find it.", "Locate the bright opacity in the upper lobe."]  # prompts of different lengths


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2vl")
    tiny_qwen2vl_folder(str(folder))
    return load_vlm(str(folder))


def rollout(vlm, group_size=3, max_new_tokens=9, seed=0):
    """Completions of different lengths: every row is cut at a different end-of-turn position."""
    torch.manual_seed(seed)
    r = grpo.sample_groups(vlm, images((200, 300), (380, 170)), QUERIES, group_size, 1.3, max_new_tokens)
    ids = r.completion_ids.clone()
    for i in range(ids.shape[0]):
        ids[i, 2 + i % (ids.shape[1] - 2):] = vlm.eos_ids[0]
    return r.batch, ids, grpo.completion_mask(ids, vlm.eos_ids)


def gradients(vlm, fn, weights, mask):
    vlm.model.zero_grad(set_to_none=True)
    logp = fn()
    (logp * weights * mask).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in vlm.model.named_parameters()}


@pytest.mark.parametrize("family", ["tiny", "qwen2vl"])
def test_shared_prefix_logps_and_gradients_equal_separate_forwards(family, request):
    vlm = request.getfixturevalue(family)
    batch, ids, mask = rollout(vlm)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # left padding in use
    assert len(set(mask.sum(1).tolist())) > 2
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    vlm.model.train()
    shared, g_shared = gradients(vlm, lambda: vlm.completion_logps(batch, ids, 0.9, mask), weights, mask)
    naive, g_naive = gradients(vlm, lambda: Naive.of(vlm).completion_logps(batch, ids, 0.9), weights, mask)
    m = mask.bool()
    assert torch.allclose(shared[m], naive[m], atol=1e-5) and (shared[~m] == 0).all()
    assert any("visual" in n for n in g_naive) and all(g is not None for g in g_naive.values())
    for name, g in g_naive.items():
        assert torch.allclose(g_shared[name], g, atol=1e-5, rtol=1e-4), name


def test_greedy_sampler_returns_the_tokens_of_transformers_generate(tiny):
    batch = tiny.encode(images((200, 300), (380, 170)), QUERIES)
    ours = grpo.sample_groups(tiny, images((200, 300), (380, 170)), QUERIES, 1, max_new_tokens=12, greedy=True)
    theirs = tiny.model.generate(**batch, do_sample=False, max_new_tokens=12, suppress_tokens=tiny.suppress_ids.tolist(),
                                 eos_token_id=tiny.eos_ids, pad_token_id=tiny.pad_id)
    theirs = theirs[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, theirs[:, :ours.completion_ids.shape[1]])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_recorded_logps_are_the_teacher_forced_logps_at_the_sampling_temperature(tiny, temperature):
    torch.manual_seed(3)
    r = grpo.sample_groups(tiny, images((200, 300), (380, 170)), QUERIES, 4, temperature, 10)
    scored = tiny.completion_logps(r.batch, r.completion_ids, temperature, r.mask)
    m = r.mask.bool()
    assert torch.allclose(r.logps[m], scored[m], atol=1e-5)
    other = tiny.completion_logps(r.batch, r.completion_ids, 1.6 - temperature, r.mask)
    assert not torch.allclose(r.logps[m], other[m], atol=1e-2)


def test_first_tokens_follow_the_softmax_at_the_sampling_temperature():
    vlm = load_vlm("tiny")
    with torch.no_grad():  # a peaked next-token distribution, so T = 0.9 and T = 1 differ clearly
        vlm.model.lm_head.weight.mul_(2)
    n, T = 6000, 0.9
    torch.manual_seed(0)
    r = grpo.sample_groups(vlm, images((200, 300)), ["q"], n, T, max_new_tokens=1)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=len(vlm.processor.tokenizer)).double()
    state, logits = vlm.prefill(r.batch, 1)

    def max_z(temperature):  # largest standardised gap between a count and its expectation
        p = vlm.policy_logprobs(logits[0], temperature).exp().double()
        return ((counts - n * p).abs() / (n * p * (1 - p) + 1).sqrt()).max().item()
    assert counts[vlm.suppress_ids].sum() == 0
    assert max_z(T) < 4.5  # ~120 tokens: a 4.5-sigma bound fails by chance with p < 1e-3
    assert max_z(1.0) > 4.5


def test_generation_config_of_the_checkpoint_does_not_leak_into_sampling(tiny, tmp_path):
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    tiny.save(str(plain))
    before = tiny.model.generation_config.to_dict()
    # Qwen2.5-VL-Instruct's own settings, and an n-gram ban on top
    tiny.model.generation_config.update(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_p=0.001,
                                        top_k=1, no_repeat_ngram_size=2)
    try:
        tiny.save(str(tuned))
    finally:
        tiny.model.generation_config.update(**before)
    draws = []
    for folder in (plain, tuned):
        torch.manual_seed(5)
        draws.append(grpo.sample_groups(load_vlm(str(folder)), images((200, 300)), ["q"], 8, 1.0, 16).completion_ids)
    assert torch.equal(draws[0], draws[1])
    assert len({tuple(row.tolist()) for row in draws[0]}) > 1  # sampled, not greedy


def test_all_stop_tokens_of_the_checkpoint_end_a_completion(tiny):
    tok = tiny.processor.tokenizer
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    model = tiny.model
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), other]
    try:
        vlm = VLM(model, tiny.processor)
    finally:
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert other in vlm.eos_ids
    ids = torch.tensor([[40, other, 41, 42]])
    assert grpo.completion_mask(ids, vlm.eos_ids).tolist() == [[1, 1, 0, 0]]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_scoring_with_the_real_vocabulary_never_builds_a_vocab_sized_tensor_per_token():
    tok = build_tiny_tokenizer(vocab_size=151_936)
    vlm = VLM(build_tiny_model(tok, hidden=64, layers=1, vision_hidden=32),
              build_tiny_processor(tok, 56 * 56, 56 * 56), template="short")
    batch = vlm.encode(images((100, 100), (120, 90)), ["a", "bb"])
    N, T = 8, 128
    ids = torch.randint(100, 151_936, (N, T), generator=torch.Generator().manual_seed(0))
    full_logits = N * T * 151_936 * 4  # one (N, T, vocab) float32 tensor: 622 MB
    sizes = {}
    for name, fn in [("shared", lambda: vlm.completion_logps(batch, ids)),
                     ("naive", lambda: Naive.of(vlm).completion_logps(batch, ids))]:
        with LargestTensor() as probe:
            fn().sum().backward()
        sizes[name] = probe.largest
    assert sizes["naive"] >= full_logits  # the probe sees the straightforward path's logits
    assert sizes["shared"] <= full_logits / 8


@pytest.mark.parametrize("temperature, sampling, amp", [(0.7, True, None), (1.0, False, None),
                                                        (0.9, True, torch.bfloat16)])
def test_the_output_layer_backward_equals_autograd_through_whole_logits(tiny, monkeypatch, temperature, sampling, amp):
    """model.OutputLayer (chunks recomputed in the backward, the weight gradient added in place)
    against autograd through the whole (M, vocab) logits: values, the hidden states' gradient and
    the weight's, over several chunks and two accumulated calls (micro-batches), with a frozen
    output layer (LoRA) too, and under bf16 autocast as bf16-mixed runs it."""
    import model
    monkeypatch.setattr(model, "LOGIT_CHUNK", 37 * tiny.model.lm_head.out_features)  # 37 positions per chunk
    monkeypatch.setattr(tiny, "amp_dtype", amp)
    weight = tiny.model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(100, weight.shape[1], generator=g), torch.randint(12, 90, (100,), generator=g),
              torch.randn(100, generator=g)) for _ in range(2)]

    def grads(score, frozen):
        weight.requires_grad_(not frozen)
        weight.grad = None
        values, hidden_grads = [], []
        for h, y, up in calls:
            h = h.clone().requires_grad_()
            value = score(h, y)
            (value * up).sum().backward()
            values.append(value.detach())
            hidden_grads.append(h.grad)
        return torch.cat(values), torch.cat(hidden_grads), weight.grad

    def whole(h, y):
        with tiny.context():
            logits = tiny.model.lm_head(h)
        return tiny.policy_logprobs(logits, temperature, sampling).gather(-1, y[:, None])[:, 0]

    def close(a, b):  # bf16: the same up to its rounding (the lean weight gradient is summed in float32)
        if amp:
            assert (a - b).norm() / b.norm() < 1e-2
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # sums of ~200 float32 terms of size ~10
    try:
        for frozen in (False, True):
            lean = grads(lambda h, y: tiny.token_logps(h, y, temperature, sampling), frozen)
            reference = grads(whole, frozen)
            close(lean[0], reference[0])
            close(lean[1], reference[1])
            if frozen:
                assert lean[2] is None and reference[2] is None
            else:
                close(lean[2], reference[2])
    finally:
        weight.requires_grad_(True)
        weight.grad = None
