"""The vision-language policy: build or load it, sample from it, score tokens under it, save it.

This file knows about Qwen2.5-VL / Qwen2-VL and their processors; it knows nothing about rewards.
- `load_vlm("tiny")` builds the embedded default: a small Qwen2.5-VL of the real transformers
  class from a config, random init, with a character-level tokenizer made in code (no downloads).
- `load_vlm(hub_id_or_folder)` loads a pretrained Qwen2.5-VL or Qwen2-VL (bf16-mixed on CUDA).
The coordinate frame of the model's answers (METHOD.md section 2) is decided here, in `COORD_FRAMES`.
"""
import copy
import string
from itertools import accumulate

import torch
from transformers import (AutoConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor)
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # our own tqdm bars are the ones worth watching

# METHOD.md section 2: Qwen2.5-VL answers in pixels of the resized input; Qwen2-VL in 0..1000.
COORD_FRAMES = {"qwen2_5_vl": "abs", "qwen2_vl": "norm1000"}
MODEL_CLASSES = {"qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
                 "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor)}
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
# Whole-word tokens of the answer templates, so the tiny model writes "<answer>" in one step.
TEMPLATE_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ROPE_THETA = 20.0  # tiny model only; see build_tiny_model
PATCH = 14  # Qwen vision patch size; the resized image is grid * PATCH pixels on each side.

# METHOD.md section 3: the two prompt templates.
R1_SUFFIX = (" First output the thinking process in <think> </think> tags and then output the final"
             " answer in <answer> </answer> tags. Output the final answer in JSON format.")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def prompt_text(query, template):
    """The user text of METHOD.md section 3 for `template` ("r1" or "short")."""
    if template == "r1":
        return query + R1_SUFFIX
    if template == "short":
        return query
    raise ValueError(f"unknown template {template!r}: expected 'r1' or 'short'")


def answer_text(box, template):
    """The ideal completion for `box` (in the model's frame; rounded to integers), METHOD.md 3."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if template == "r1":
        return (f'<think>The target region is visible in the image.</think>'
                f'<answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>')
    return f"<answer>[{x1},{y1},{x2},{y2}]</answer>"


# ----------------------------------------------------------------------------- the tiny model
def build_tiny_tokenizer():
    """Character-level tokenizer with the Qwen special tokens (no files needed)."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TEMPLATE_TOKENS + ["<unk>"] + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.add_tokens(TEMPLATE_TOKENS)  # matched whole before the character split
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_processor(tokenizer, min_pixels, max_pixels):
    """A real Qwen2.5-VL processor around the tiny tokenizer, with a fixed pixel budget."""
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(),
                               chat_template=TINY_CHAT_TEMPLATE)


def build_tiny_model(tokenizer, hidden=128, layers=4, vision_hidden=64, seed=0):
    """A ~1.2 M parameter Qwen2_5_VLForConditionalGeneration from a config (see shared NOTES.md).

    Four text layers, not two: with rotary positions only, the model has to work out where an
    image token sits from attention alone, and two layers learned that several times slower."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = hidden // 32  # head_dim 32, i.e. 16 rotary frequencies shared by (t, h, w)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(heads // 2, 1),
                         max_position_embeddings=2048, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=True,
                         # a small rope theta and most frequencies on rows and columns (an image has
                         # one frame): Qwen's 1e6 barely tells neighbouring tokens of a 3x4 grid apart
                         rope_scaling={"type": "mrope", "rope_type": "default", "rope_theta": ROPE_THETA,
                                       "mrope_section": [2, 7, 7]}),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_hidden // 16, out_hidden_size=hidden, patch_size=PATCH,
                           spatial_merge_size=2,
                           temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=True)
    # travel in config.json, so a saved tiny model reloads as tiny with its template
    config.medloc_tiny, config.medloc_template = True, "short"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


# ----------------------------------------------------------------------------- the wrapper
class VLM:
    """A policy: HF model + processor + its coordinate frame and prompt template."""

    def __init__(self, model, processor, template=None, amp_dtype=None):
        model_type = model.config.model_type
        if model_type not in COORD_FRAMES:
            raise ValueError(f"model type {model_type!r} has no known coordinate frame; "
                             f"supported: {sorted(COORD_FRAMES)} (METHOD.md section 2)")
        self.model, self.processor = model, processor
        self.amp_dtype = amp_dtype  # bf16 autocast over fp32 weights ("bf16-mixed"), or None
        self.coord = COORD_FRAMES[model_type]
        self.template = template or getattr(model.config, "medloc_template", "r1")
        self.is_tiny = bool(getattr(model.config, "medloc_tiny", False))
        tok = processor.tokenizer
        tok.padding_side = "left"  # generation appends on the right
        self.pad_id = tok.pad_token_id
        # end of turn first: it is the token an SFT answer ends with
        self.eos_ids = list(dict.fromkeys(i for i in (tok.convert_tokens_to_ids("<|im_end|>"),
                                                      tok.eos_token_id) if i is not None))
        self.vision_ids = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]

    @property
    def device(self):
        return self.model.device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def encode(self, images, queries):
        """Processor batch (left-padded) for one chat turn per (image, query) pair."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": prompt_text(q, self.template)}]}],
            tokenize=False, add_generation_prompt=True) for q in queries]
        batch = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")
        return batch.to(self.device)

    @staticmethod
    def input_sizes(batch):
        """(width, height) of each processor-resized image: grid_thw * 14 (METHOD.md section 2)."""
        return [(int(w) * PATCH, int(h) * PATCH) for _, h, w in batch["image_grid_thw"].tolist()]

    @torch.no_grad()
    def generate(self, batch, max_new_tokens, temperature=1.0, greedy=False):
        """Completion token ids (N, T); vision special tokens are suppressed (METHOD.md section 3)."""
        if greedy:
            sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:  # explicit top_k / top_p: never inherit a model's near-greedy defaults
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        was_training = self.model.training
        self.model.eval()  # sample in eval mode: KV cache on even with gradient checkpointing
        with self.autocast():
            out = self.model.generate(**batch, **sampling, max_new_tokens=max_new_tokens,
                                      suppress_tokens=self.vision_ids, eos_token_id=self.eos_ids,
                                      pad_token_id=self.pad_id)
        self.model.train(was_training)
        return out[:, batch["input_ids"].shape[1]:]

    def decode(self, completion_ids):
        return self.processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

    def completion_logps(self, batch, completion_ids):
        """log p(token) of each completion token, shape (N, T), float32; prompt logits never built."""
        n, t = completion_ids.shape
        ones = torch.ones_like(completion_ids)
        extra = {}
        if "mm_token_type_ids" in batch:  # completion tokens are text (type 0)
            extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], 0 * ones], 1)
        with self.autocast():
            out = self.model(input_ids=torch.cat([batch["input_ids"], completion_ids], 1),
                             attention_mask=torch.cat([batch["attention_mask"], ones], 1),
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             logits_to_keep=t + 1, use_cache=False, **extra)
        logits = out.logits[:, :-1]  # position j predicts completion token j
        # one sequence at a time keeps the float32 (T, vocab) buffer small for 150k-token vocabularies
        return torch.stack([logits[i].float().log_softmax(-1).gather(-1, completion_ids[i, :, None])[:, 0]
                            for i in range(n)])

    @staticmethod
    def select_rows(batch, start, end):
        """Rows start:end of a processor batch (pixel_values hold t*h*w patch rows per image)."""
        offsets = [0] + list(accumulate(batch["image_grid_thw"].prod(-1).tolist()))
        rows = {k: v[start:end] for k, v in batch.items() if k != "pixel_values"}
        rows["pixel_values"] = batch["pixel_values"][offsets[start]:offsets[end]]
        return rows

    def frozen_copy(self):
        """A frozen reference policy (METHOD.md section 5, the KL anchor)."""
        ref = copy.copy(self)
        ref.model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.amp_dtype is not None:  # no optimizer steps on it: plain bf16 weights suffice
            ref.model.to(self.amp_dtype)
            ref.amp_dtype = None
        return ref

    def save(self, folder):
        """save_pretrained folder (safetensors + processor) that `load_vlm(folder)` reads back."""
        self.model.config.medloc_template = self.template
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
              "bf16-mixed": (torch.float32, torch.bfloat16)}


def load_vlm(name, device="cpu", precision="auto", min_pixels=None, max_pixels=None,
             gradient_checkpointing=False, freeze_vision=False, template=None, seed=0):
    """`tiny`, a hub id or a local folder -> VLM on `device`.

    precision "auto" is bf16-mixed on CUDA (fp32 weights, bf16 autocast: with lr 1e-6, pure bf16
    weights would round most updates away) and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16-mixed" if str(device).startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected auto or one of {sorted(PRECISIONS)}")
    dtype, amp_dtype = PRECISIONS[precision]
    if name == "tiny":
        tok = build_tiny_tokenizer()
        processor = build_tiny_processor(tok, min_pixels or 56 * 56, max_pixels or 112 * 112)
        model = build_tiny_model(tok, seed=seed)
    else:
        try:
            model_type = AutoConfig.from_pretrained(name).model_type
        except OSError as e:  # missing folder, bad hub id, no network
            raise ValueError(f"{name}: not a model folder, and not loadable as a hub id ({e})")
        if model_type not in MODEL_CLASSES:
            raise ValueError(f"{name}: model type {model_type!r} is not supported; "
                             f"expected one of {sorted(MODEL_CLASSES)}")
        model_cls, processor_cls = MODEL_CLASSES[model_type]
        processor = processor_cls.from_pretrained(name)
        if min_pixels or max_pixels:  # transformers 5 keeps the pixel budget in `size`
            size = processor.image_processor.size
            processor.image_processor.size = {"shortest_edge": min_pixels or size.shortest_edge,
                                              "longest_edge": max_pixels or size.longest_edge}
        model = model_cls.from_pretrained(name, dtype=dtype)
    model.to(device=device, dtype=dtype)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # training forwards pass use_cache=False themselves
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    return VLM(model, processor, template=template, amp_dtype=amp_dtype)
