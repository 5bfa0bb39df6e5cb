"""The lean GRPO step computes what the straightforward one does (METHOD.md section 5).

Shared-prefix log-probs and gradients against G separate forwards, the hand-written sampler against
transformers' generate and against the softmax it claims to draw from, and the memory of scoring
with a 151,936-token vocabulary.
"""
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grpo
import lora
import start
import train
from measure import Naive
from config import Config
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


def weighted(weights, mask):
    """The objective sum_t weights_t log pi_t over the scored tokens, for VLM.completion_loss."""
    w = weights[mask.bool()]
    return lambda logp, start, stop: w[start:stop] * logp


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["tiny", "qwen2vl"])
def test_shared_prefix_logps_and_gradients_equal_separate_forwards(family, request):
    vlm = request.getfixturevalue(family)
    batch, ids, mask = rollout(vlm)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # left padding in use
    assert len(set(mask.sum(1).tolist())) > 2
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    vlm.model.train()
    vlm.model.zero_grad(set_to_none=True)
    loss, shared = vlm.completion_loss(batch, ids, weighted(weights, mask), 0.9, mask)
    loss.backward()
    g_shared = grads(vlm.model)
    vlm.model.zero_grad(set_to_none=True)
    naive = Naive.of(vlm).completion_logps(batch, ids, 0.9)
    (naive * weights * mask).sum().backward()
    g_naive = grads(vlm.model)
    m = mask.bool()
    assert torch.allclose(shared[m], naive[m], atol=1e-5) and (shared[~m] == 0).all()
    assert torch.allclose(loss, (naive * weights * mask).sum(), atol=1e-5)
    assert any("visual" in n for n in g_naive) and len(g_naive) == len(list(vlm.model.parameters()))
    assert g_shared.keys() == g_naive.keys()
    for name, g in g_naive.items():
        assert torch.allclose(g_shared[name], g, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("loss_type, micro_batch, adapters, ratio", [
    ("grpo", 3, False, "token"), ("bnpo", 0, False, "token"), ("dr_grpo", 3, False, "token"), ("grpo", 3, True, "token"),
    ("cispo", 3, False, "token"), ("grpo", 3, False, "sequence"), ("bnpo", 0, False, "sequence")])
def test_policy_update_gradients_equal_the_grpo_loss_of_whole_logits(loss_type, micro_batch, adapters, ratio,
                                                                     monkeypatch):
    """train.policy_update (micro-batches, the loss's gradient taken in the output layer) against
    grpo.grpo_loss on whole (N, T, vocab) logits through autograd, over mu = 2 updates with an SGD
    step between them: the second update's ratio is no longer 1 and clips. GSPO (ratio "sequence"):
    s_i from a scoring pass before the forward against s_i through autograd over all its tokens."""
    lr, cfg = 3.0, Config(batch_prompts=2, group_size=3, max_new_tokens=9, loss_type=loss_type, micro_batch=micro_batch,
                          updates_per_rollout=2, beta=0.1, eps=0.2, eps_high=0.28, temperature=0.9, ratio=ratio)
    policies = [load_vlm("tiny"), load_vlm("tiny")]  # the same weights: one for each path
    if adapters:  # LoRA: a frozen output layer, and the reference is the model without adapters
        for vlm in policies:
            torch.manual_seed(7)
            lora.inject(vlm.model, 4, 8)
            for name, p in vlm.model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
    refs = [vlm.frozen_copy() for vlm in policies]
    if not adapters:  # a reference away from the policy, so that the KL has a gradient
        for ref in refs:
            torch.manual_seed(8)
            with torch.no_grad():
                for p in ref.model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
    batch, ids, mask = rollout(policies[0])
    adv = torch.randn(6, generator=torch.Generator().manual_seed(2))
    steps = []

    def sgd(run):  # stands in for apply_update: records the gradient, then a plain step
        steps.append(grads(run.policy.model))
        with torch.no_grad():
            for p in run.params:
                p -= lr * p.grad
                p.grad = None
        return 0.0
    monkeypatch.setattr(train, "apply_update", sgd)
    params = [p for p in policies[0].model.parameters() if p.requires_grad]
    run = start.Run(cfg, None, policies[0], refs[0], None, params, None)
    stats = train.policy_update(run, grpo.Rollout(batch, ids, mask, [], torch.zeros(ids.shape)), adv, {})
    lean = steps[:]

    steps.clear()
    naive, params = Naive.of(policies[1]), [p for p in policies[1].model.parameters() if p.requires_grad]
    ref_logp = Naive.of(refs[1]).completion_logps(batch, ids, 0.9).detach()
    old = None
    for _ in range(2):
        logp = naive.completion_logps(batch, ids, 0.9)
        old = logp.detach() if old is None else old
        loss, clipped = grpo.grpo_loss(logp, old, ref_logp, adv, mask, eps=0.2, eps_high=0.28, beta=0.1,
                                       loss_type=loss_type, max_new_tokens=9, ratio=ratio)
        loss.backward()
        sgd(types.SimpleNamespace(policy=naive, params=params))
    assert clipped["clip_frac"] > 0 and stats["clip_frac"] > 0  # the second update clipped
    assert any("embed_tokens" in n for n in lean[0]) != adapters  # the tied output layer: trained or frozen
    for mine, theirs in zip(lean, steps):
        assert mine.keys() == theirs.keys()
        for name, g in theirs.items():
            assert (mine[name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name  # float32 sums in other orders


@pytest.mark.parametrize("family", ["tiny", "qwen2vl"])
def test_greedy_sampler_returns_the_tokens_of_transformers_generate(family, request):
    vlm = request.getfixturevalue(family)
    batch = vlm.encode(images((200, 300), (380, 170)), QUERIES)
    ours = grpo.sample_groups(vlm, images((200, 300), (380, 170)), QUERIES, 1, max_new_tokens=12, greedy=True)
    theirs = vlm.model.generate(**batch, do_sample=False, max_new_tokens=12, suppress_tokens=vlm.suppress_ids.tolist(),
                                eos_token_id=vlm.eos_ids, pad_token_id=vlm.pad_id)
    theirs = theirs[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, theirs[:, :ours.completion_ids.shape[1]])


def test_compiled_decoding_draws_what_eager_decoding_draws_and_compiles_once():
    """--compile (VLM.compile_decoding): the same seed gives the same completions and log-probs as
    eager decoding, and prompts of other lengths (one cache block) reuse the one compiled step."""
    import torch._dynamo
    eager, compiled = load_vlm("tiny"), load_vlm("tiny")
    compiled.compile_decoding()
    torch._dynamo.reset()
    pictures = [images((200, 300), (380, 170)), images((300, 300), (120, 170))]
    queries = [QUERIES, ["Where?", "Find the bright opacity near the lower border."]]
    lengths = set()
    for pics, prompts in zip(pictures, queries):
        draws = []
        for vlm in (eager, compiled):
            torch.manual_seed(4)
            draws.append(grpo.sample_groups(vlm, pics, prompts, 3, 1.0, 10, finished=lambda done: False))
        assert torch.equal(draws[0].completion_ids, draws[1].completion_ids)
        assert torch.allclose(draws[0].logps, draws[1].logps, atol=1e-5)
        lengths.add(draws[0].batch["input_ids"].shape[1])
    assert len(lengths) == 2  # two prompt lengths ...
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # ... one compiled step


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_recorded_logps_are_the_teacher_forced_logps_at_the_sampling_temperature(tiny, temperature):
    torch.manual_seed(3)
    r = grpo.sample_groups(tiny, images((200, 300), (380, 170)), QUERIES, 4, temperature, 10)
    scored = tiny.completion_logps(r.batch, r.completion_ids, temperature, r.mask)
    m = r.mask.bool()
    assert torch.allclose(r.logps[m], scored[m], atol=1e-5)
    other = tiny.completion_logps(r.batch, r.completion_ids, 1.6 - temperature, r.mask)
    assert not torch.allclose(r.logps[m], other[m], atol=1e-2)



@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_rollouts_in_bf16_record_the_logps_the_scorer_gives(precision):
    """bf16-mixed is what CUDA runs by default; there the static KV cache holds float32 keys (out of
    the rotary embedding) and bf16 values. The sampler's log-probs are the scorer's up to bf16
    rounding (seen: 0.003 nats)."""
    vlm = load_vlm("tiny", precision=precision)
    torch.manual_seed(3)
    r = grpo.sample_groups(vlm, images((200, 300), (380, 170)), QUERIES, 4, 1.0, 10)
    scored = vlm.completion_logps(r.batch, r.completion_ids, 1.0, r.mask)
    m = r.mask.bool()
    assert m.sum() >= 16 and torch.allclose(r.logps[m], scored[m], atol=0.02)

def test_first_tokens_follow_the_softmax_at_the_sampling_temperature():
    vlm = load_vlm("tiny")
    with torch.no_grad():  # a peaked next-token distribution, so T = 0.9 and T = 1 differ clearly
        vlm.model.lm_head.weight.mul_(2)
    n, T = 6000, 0.9
    torch.manual_seed(0)
    r = grpo.sample_groups(vlm, images((200, 300)), ["q"], n, T, max_new_tokens=1)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=len(vlm.processor.tokenizer)).double()
    state, logits = vlm.prefill(r.batch, 1, 1)

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
    ones = torch.ones(N, T)
    sizes = {}
    for name, fn in [("shared", lambda: vlm.completion_loss(batch, ids, weighted(ones, ones))[0]),
                     ("naive", lambda: Naive.of(vlm).completion_logps(batch, ids).sum())]:
        with LargestTensor() as probe:
            fn().backward()
        sizes[name] = probe.largest
    assert sizes["naive"] >= full_logits  # the probe sees the straightforward path's logits
    assert sizes["shared"] <= full_logits / 8


@pytest.mark.parametrize("temperature, sampling, amp", [(0.7, True, None), (1.0, False, None),
                                                        (0.9, True, torch.bfloat16)])
def test_the_output_layer_equals_autograd_through_whole_logits(tiny, monkeypatch, temperature, sampling, amp):
    """model.OutputLayer (chunks, the loss's gradient taken in the forward, the weight gradient
    added in place) against autograd through the whole (M, vocab) logits: the loss, the log-probs,
    the hidden states' gradient and the weight's, over several chunks and two accumulated calls
    (micro-batches), for a loss that is not linear in log pi, with a frozen output layer (LoRA)
    too, and under bf16 autocast as bf16-mixed runs it."""
    import model
    monkeypatch.setattr(model, "LOGIT_CHUNK", 37 * tiny.model.lm_head.out_features)  # 37 positions per chunk
    monkeypatch.setattr(tiny, "amp_dtype", amp)
    weight = tiny.model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(100, weight.shape[1], generator=g), torch.randint(12, 90, (100,), generator=g),
              torch.randn(100, generator=g)) for _ in range(2)]
    loss_of = lambda logp, up: up * torch.exp(logp) + logp ** 2  # noqa: E731  (per token, like GRPO's)

    def run(score, frozen):
        weight.requires_grad_(not frozen)
        weight.grad = None
        losses, values, hidden_grads = [], [], []
        for h, y, up in calls:
            h = h.clone().requires_grad_()
            loss, value = score(h, y, up)
            loss.backward()
            losses.append(loss.detach())
            values.append(value.detach())
            hidden_grads.append(h.grad)
        return torch.stack(losses), torch.cat(values), torch.cat(hidden_grads), weight.grad

    def lean(h, y, up):
        return model.OutputLayer.apply(h, weight, y, tiny, temperature, sampling,
                                       lambda logp, start, stop: loss_of(logp, up[start:stop]))

    def whole(h, y, up):
        with tiny.context():
            logits = tiny.model.lm_head(h)
        logp = tiny.policy_logprobs(logits, temperature, sampling).gather(-1, y[:, None])[:, 0]
        return loss_of(logp, up).sum(), logp

    def close(a, b):  # bf16: the same up to its rounding (the lean weight gradient is summed in float32)
        if amp:
            assert (a - b).norm() / b.norm() < 1e-2
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # sums of ~200 float32 terms of size ~10
    try:
        for frozen in (False, True):
            mine, reference = run(lean, frozen), run(whole, frozen)
            for a, b in zip(mine[:3], reference[:3]):
                close(a, b)
            if frozen:
                assert mine[3] is None and reference[3] is None
            else:
                close(mine[3], reference[3])
        with pytest.raises(RuntimeError, match="as it is"):  # dW is in place already: no scaling afterwards
            h = calls[0][0].clone().requires_grad_()
            (2 * lean(h, calls[0][1], calls[0][2])[0]).backward()
    finally:
        weight.requires_grad_(True)
        weight.grad = None
