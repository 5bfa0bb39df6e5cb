"""Time the GRPO step (METHOD.md section 5) and count the work it does, lean path vs naive path.

    python bench.py                         # tiny default, lean step only
    python bench.py --naive                 # + the straightforward step, interleaved, with ratios
    python bench.py --model proxy --naive   # random-init Qwen2.5-VL, 151,936 vocab, ~256 image tokens
    python bench.py --model 3b              # Qwen2.5-VL-3B dimensions (random init; for a GPU)
    python bench.py --memory                # peak memory of one log-prob pass, each path in a fresh process

The lean step samples with the prompt prefilled once per group and scores each group in one row
(grpo.sample_groups, VLM.completion_logps); `--naive` runs the same step (train.grpo_step) with a
`Naive` policy, which repeats every prompt G times through the vision encoder and the language
model when it prefills and when it scores, with full (N, T, vocab) logits. Completions always run
to --max-new-tokens (no stop token), so both paths do the same work whatever a random model samples.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch allocates
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import train
from config import Config
from data import load_dataset
from model import PRECISIONS, VLM, build_tiny_processor, build_tiny_tokenizer, load_vlm
from scheduler import make_schedule
from start import Run
from tasks import Grounding

PHASES = ("rollout", "reward", "reference", "policy_forward", "backward", "optimizer")
# Shapes of the benchmark models. proxy: what a CPU can step in seconds with the real vocabulary
# and image-token count; 3b: Qwen2.5-VL-3B-Instruct's config.json dimensions.
SHAPES = {
    "proxy": dict(hidden=512, layers=8, heads=4, kv_heads=2, mlp=1536, mrope=[16, 24, 24], theta=1e6,
                  vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                              fullatt_block_indexes=[3])),
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, mlp=11008, mrope=[16, 24, 24], theta=1e6,
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31])),
}
IMAGE_TOKENS = 256  # merged tokens per image for proxy / 3b: a 16 x 16 grid of 28-pixel cells
# B prompts x G completions, new tokens, and sequences per forward/backward (one group: the
# straightforward path's (8, T, 151,936) float32 logits alone are 0.6 GiB for 128 tokens)
SETTINGS = {"tiny": dict(B=4, G=8, new=24, micro=0), "proxy": dict(B=4, G=8, new=128, micro=8),
            "3b": dict(B=4, G=8, new=256, micro=8)}


def build(name, device, precision):
    """The benchmark policy: the built-in tiny model, or a random-init Qwen2.5-VL of a SHAPES entry."""
    if name == "tiny":
        return load_vlm("tiny", device, precision, gradient_checkpointing=device == "cuda")
    s = SHAPES[name]
    tok = build_tiny_tokenizer(vocab_size=151_936)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=name != "3b",
                         rope_scaling={"type": "mrope", "rope_type": "default", "rope_theta": s["theta"],
                                       "mrope_section": s["mrope"]}),
        vision_config=dict(**s["vision"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    torch.manual_seed(0)
    dtype, amp = train_precision(device, precision)
    model = Qwen2_5_VLForConditionalGeneration(config).to(device=device, dtype=dtype)
    if device == "cuda":
        model.activation_checkpointing_enable()
    pixels = IMAGE_TOKENS * 28 * 28
    return VLM(model, build_tiny_processor(tok, pixels, pixels), template="r1", amp_dtype=amp)


def train_precision(device, precision):
    """(weight dtype, autocast dtype) as load_vlm picks them."""
    if precision == "auto":
        precision = "bf16-mixed" if device == "cuda" else "fp32"
    return PRECISIONS[precision]


def repeat_rows(batch, copies):
    """The processor batch with every prompt repeated `copies` times (pixel rows included)."""
    parts = [VLM.select_rows(batch, i, i + 1) for i in range(batch["input_ids"].shape[0]) for _ in range(copies)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class Naive(VLM):
    """The straightforward path, the reference of the lean one (here and in tests/test_step.py):
    every prompt repeated G times through the whole model when sampling and when scoring."""

    @classmethod
    def of(cls, vlm):
        naive = copy.copy(vlm)  # the same model and processor
        naive.__class__ = cls
        return naive

    def prefill(self, batch, copies):
        return super().prefill(repeat_rows(batch, copies), 1)  # G prompt prefills, no cache copies

    def completion_logps(self, batch, completion_ids, temperature=1.0, mask=None, sampling=True):
        """log pi(token) (N, T) from full (N, T, vocab) logits of the prompts repeated G times."""
        N, T = completion_ids.shape
        rows = repeat_rows(batch, N // batch["input_ids"].shape[0])
        ones = torch.ones_like(completion_ids)
        extra = {}
        if "mm_token_type_ids" in rows:
            extra["mm_token_type_ids"] = torch.cat([rows["mm_token_type_ids"], 0 * ones], 1)
        with self.context():
            logits = self.model(input_ids=torch.cat([rows["input_ids"], completion_ids], 1),
                                attention_mask=torch.cat([rows["attention_mask"], ones], 1),
                                pixel_values=rows["pixel_values"], image_grid_thw=rows["image_grid_thw"],
                                logits_to_keep=T + 1, use_cache=False, **extra).logits[:, :-1]
        return self.policy_logprobs(logits, temperature, sampling).gather(-1, completion_ids[..., None])[..., 0]


class Counter:
    """Forward hooks that count the vision encoder's images and the prompt tokens the language model
    processes (prompt columns of each call: a call shorter than the prompt is a decode step)."""

    def __init__(self, *vlms):
        self.images = self.prompt_tokens = 0
        self.prompt_len = 0
        for vlm in vlms:
            vlm.model.model.visual.register_forward_pre_hook(self.vision, with_kwargs=True)
            vlm.model.model.language_model.register_forward_pre_hook(self.language, with_kwargs=True)

    def vision(self, module, args, kwargs):
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.images += grid_thw.shape[0]  # one (t, h, w) row per image

    def language(self, module, args, kwargs):
        rows, cols = kwargs["inputs_embeds"].shape[:2]
        self.prompt_tokens += rows * min(cols, self.prompt_len) if cols >= self.prompt_len else 0

    def reset(self, prompt_len):
        self.images = self.prompt_tokens = 0
        self.prompt_len = prompt_len


def step_once(run, samples, counter):
    """One GRPO step; returns seconds per phase, completion tokens and the counters."""
    cfg = run.cfg
    prompt_len = run.policy.encode([samples[0].image()], [run.task.prompt(samples[0])])["input_ids"].shape[1]
    counter.reset(prompt_len)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    phases = {}
    logs = train.grpo_step(run, samples, phases)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    return {**{p: phases.get(p, 0.0) for p in PHASES}, "total": sum(phases.values()),
            "completions": cfg.batch_prompts * cfg.group_size, "tokens": logs["completion_tokens"], "images": counter.images, "prompt_tokens": counter.prompt_tokens,
            "peak_gib": peak}


def run_bench(a):
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    s = SETTINGS[a.model]
    B, G, new = a.batch_prompts or s["B"], a.group_size or s["G"], a.max_new_tokens or s["new"]
    policy = build(a.model, device, a.precision)
    # completions run to max_new_tokens: a suppressed token never gets sampled, so nothing stops
    policy.eos_ids = policy.suppress_ids[:1].tolist()
    ref = policy.frozen_copy()
    counter = Counter(policy, ref)
    data = load_dataset("synth:mix")
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    cfg = Config(batch_prompts=B, group_size=G, max_new_tokens=new, micro_batch=s["micro"], lr=1e-6)
    task, tau = Grounding(policy.template, policy.coord), make_schedule("fixed", tau=0.5)
    runs = {"lean": Run(cfg, task, policy, ref, optimizer, params, tau)}
    if a.naive:
        runs["naive"] = Run(cfg, task, Naive.of(policy), Naive.of(ref), optimizer, params, tau)
    results = {v: [] for v in runs}
    for i in range(a.warmup + a.steps):  # interleaved, so outside load hits both paths alike
        samples = [data[(i * B + k) % len(data)] for k in range(B)]
        for v, run in runs.items():
            r = step_once(run, samples, counter)
            if i >= a.warmup:
                results[v].append(r)
    print(f"{a.model} on {device}, {torch.get_num_threads()} thread(s): B={B}, G={G}, {new} new tokens, "
          f"micro-batch {s['micro'] or B * G}, median of {a.steps} steps after {a.warmup} warm-up")
    print(table(results))
    return results


def table(results):
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    cols = list(med)
    rows = [(f"{p} s", p, "{:.3f}") for p in PHASES + ("total",)]
    lines = [f"| {'':<22} | " + " | ".join(f"{c:>10}" for c in cols) + (" | naive / lean |" if "naive" in med else " |"),
             "|" + "---|" * (len(cols) + 1 + ("naive" in med))]
    for label, key, fmt in rows + [("completions / s", None, "{:.1f}"), ("tokens / s", None, "{:.1f}"),
                                   ("vision images / step", "images", "{:.0f}"),
                                   ("prompt tokens / step", "prompt_tokens", "{:.0f}"),
                                   ("peak GiB (CUDA)", "peak_gib", "{:.2f}")]:
        vals = {}
        for c in cols:
            m = med[c]
            if label == "completions / s":
                vals[c] = m["completions"] / m["total"]
            elif label == "tokens / s":
                vals[c] = m["tokens"] / m["total"]
            else:
                vals[c] = m[key]
        line = f"| {label:<22} | " + " | ".join(f"{fmt.format(vals[c]):>10}" for c in cols)
        if "naive" in med:
            ratio = vals["naive"] / vals["lean"] if vals["lean"] else float("nan")
            line += f" | {ratio:>12.2f}"
        lines.append(line + " |")
    return "\n".join(lines)


def memory_probe(a):
    """Fresh process: peak RSS growth of one log-prob forward + backward, 8 x 128 tokens, either
    the whole pass (model included) or the log-prob head alone (final hidden states -> log-probs)."""
    torch.manual_seed(0)
    policy = build("proxy", "cpu", "fp32")
    ids = torch.randint(200, 151_936, (8, 128))
    if a.probe.endswith("head"):
        hidden = torch.randn(8 * 128, policy.model.lm_head.in_features, requires_grad=True)
        base = rss_gib()
        if a.probe == "lean-head":
            policy.token_logps(hidden, ids.flatten(), 1.0).sum().backward()
        else:
            logits = policy.model.lm_head(hidden).view(8, 128, -1)
            policy.policy_logprobs(logits, 1.0).gather(-1, ids[..., None]).sum().backward()
    else:
        data = load_dataset("synth:mix")
        batch = policy.encode([data[0].image(), data[1].image()], [data[0].query, data[1].query])
        base = rss_gib()
        scorer = Naive.of(policy) if a.probe == "naive-pass" else policy
        scorer.completion_logps(batch, ids).sum().backward()
    print(json.dumps({"probe": a.probe, "extra_gib": peak_rss_gib() - base}))


def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def run_memory():
    out = {}
    for probe in PROBES:
        res = subprocess.run([sys.executable, __file__, "--probe", probe], capture_output=True, text=True, check=True)
        out[probe] = json.loads(res.stdout.strip().splitlines()[-1])["extra_gib"]
    print("peak memory over the loaded model (GiB), proxy model (151,936 vocab), 8 sequences x 128 tokens,")
    print("fp32, forward + backward, each in a fresh process (peak RSS):")
    print("| part | lean | naive | lean / naive |\n|---|---|---|---|")
    for part in ("head", "pass"):
        lean, naive = out[f"lean-{part}"], out[f"naive-{part}"]
        label = "log-prob head (hidden states -> log-probs)" if part == "head" else "whole log-prob pass"
        print(f"| {label} | {lean:.2f} | {naive:.2f} | {lean / naive:.2f} |")


PROBES = ("lean-head", "naive-head", "lean-pass", "naive-pass")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "proxy", "3b"))
    p.add_argument("--naive", action="store_true", help="also time the straightforward step, interleaved")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    p.add_argument("--batch-prompts", type=int, default=None, help="B (default: 4)")
    p.add_argument("--group-size", type=int, default=None, help="G (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 tiny, 128 proxy, 256 3b")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "bf16-mixed"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 for comparable timings)")
    p.add_argument("--memory", action="store_true", help="peak memory of one log-prob pass, lean vs naive")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    lowest = {"steps": 1, "warmup": 0, "batch_prompts": 1, "group_size": 2, "max_new_tokens": 1, "threads": 1}
    for name, lo in lowest.items():  # a group of one has no advantage (its std is undefined)
        if getattr(a, name) is not None and getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least {lo}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    torch.set_num_threads(a.threads)
    if a.probe:
        return memory_probe(a)
    if a.memory:
        return run_memory()
    return run_bench(a)


if __name__ == "__main__":
    main()
