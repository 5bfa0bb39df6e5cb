"""The vision-language policy: build or load it, sample from it, score tokens under it, save it.

This file knows the model families (`FAMILIES`) and their processors; it knows nothing about rewards.
- `load_vlm("tiny")` builds the embedded default: a small Qwen2.5-VL of the real transformers
  class from a config, random init, with a character-level tokenizer made in code (no downloads).
- `load_vlm(hub_id_or_folder)` loads a pretrained model of a family in `FAMILIES` (bf16-mixed on CUDA).
What differs between families (classes, the coordinate frame of the answers: METHOD.md section 2)
is one row of `FAMILIES`; the sampler and the scorer below are written once.
"""
import contextlib
import copy
import ctypes
import glob
import inspect
import json
import os
import re
import string
from dataclasses import dataclass
from itertools import accumulate

import torch
from huggingface_hub import snapshot_download
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers import (AutoConfig, DynamicCache, Gemma3ForConditionalGeneration, Gemma3Processor, GenerationConfig,
                          PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, Qwen3_5ForConditionalGeneration,
                          SmolVLMForConditionalGeneration, SmolVLMProcessor)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin, LinearAttentionLayer, StaticLayer
from transformers.utils import logging as hf_logging

import lora
from files import first_line

hf_logging.disable_progress_bar()  # our own tqdm bars are the ones worth watching



# Checkpoint names: (prefix in a save_pretrained folder, prefix in the model). Hub folders of the
# Qwen2(.5)-VL generation call the text layers model.* and the vision tower visual.*; Gemma 3's
# (saved by transformers 4) nest the text layers in language_model.model.*; transformers 5 nests
# both under model.*. Qwen3-VL's folders already use the model's names.
QWEN_KEYS = (("visual.", "model.visual."), ("model.", "model.language_model."))
GEMMA_KEYS = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head."))
QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
GEMMA_VISION = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
# SmolVLM2's image block: <fake_token_around_image>, a tile's <row_r_col_c> (up to 6 x 6) or the whole
# image's <global-img>, then its <image> tokens
SMOLVLM_VISION = ("<fake_token_around_image>", "<global-img>", "<image>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))


@dataclass(frozen=True)
class Family:
    """What differs between the model families a run can train, in one place (README, Model families).
    coord: the frame its answers' boxes are in (METHOD.md section 2: "abs", pixels of the resized
    input; "norm1000", 0..1000 of the image); units: the class names of its decoder layer and its
    vision block, FSDP's units (dist.shard); vision: the modules of `model.model` that
    --freeze-vision freezes; turn_end: the token an answer ends with (SFT's last target, the first
    stop token); vision_tokens: never sampled (a vision token in a completion breaks the next
    forward, METHOD.md 3); images: "grid" (Qwen: any size, resized to whole patches, `image_grid_thw`
    in the batch), "fixed" (Gemma 3: every image resized to the image processor's one size) or
    "tiles" (SmolVLM2: resized with its aspect kept, cut into square tiles, and the whole image
    once more at tile size; `pixel_values` (B, tiles, 3, S, S) with a pixel mask, the tiles of a
    shorter row all zero); text: the attribute of the body that holds the language model;
    positions: "mrope" (Qwen's (t, h, w) rotary positions, get_rope_index) or "text" (1-D, the
    token count); bidirectional_images: the image tokens of one image see each other (Gemma 3),
    in the scoring mask too; keys: checkpoint names (file prefix, model prefix); recurrent: some
    layers are linear attention (Qwen3.5's Gated DeltaNet), whose state runs along the row, so no
    mask can share one prompt between completions: the scorer gives each completion a row of its own
    after its prompt (`row_hidden`), and the sampler copies the prompt's state G times."""
    model: type
    processor: type
    coord: str
    units: tuple
    vision: tuple = ("visual",)
    turn_end: str = "<|im_end|>"
    vision_tokens: tuple = QWEN_VISION
    images: str = "grid"
    positions: str = "mrope"
    bidirectional_images: bool = False
    keys: tuple = QWEN_KEYS
    recurrent: bool = False
    text: str = "language_model"


FRAMES = {"abs": "pixels of the resized input", "norm1000": "0..1000 of the image"}  # Family.coord, in words
FAMILIES = {
    "qwen2_vl": Family(Qwen2VLForConditionalGeneration, Qwen2VLProcessor, "norm1000",
                       ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock")),
    "qwen2_5_vl": Family(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, "abs",
                         ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")),
    "qwen3_vl": Family(Qwen3VLForConditionalGeneration, Qwen3VLProcessor, "norm1000",
                       ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")),
    "qwen3_vl_moe": Family(Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, "norm1000",
                           ("Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock")),
    # Qwen3.5: Qwen3-VL's vision and frame; Gated DeltaNet layers between its full-attention ones
    "qwen3_5": Family(Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, "norm1000",
                      ("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"), recurrent=True),
    # SmolVLM2: no box format of its own either (METHOD.md 2); SmolLM2 (a Llama) reads the tiles
    "smolvlm": Family(SmolVLMForConditionalGeneration, SmolVLMProcessor, "norm1000",
                      ("LlamaDecoderLayer", "SmolVLMEncoderLayer"), vision=("vision_model", "connector"),
                      turn_end="<end_of_utterance>", vision_tokens=SMOLVLM_VISION, images="tiles", positions="text",
                      keys=(), text="text_model"),
    # Gemma 3 and MedGemma: no box format of its own, so Qwen2/3-VL's 0-1000 of the image (METHOD.md 2)
    "gemma3": Family(Gemma3ForConditionalGeneration, Gemma3Processor, "norm1000",
                     ("Gemma3DecoderLayer", "SiglipEncoderLayer"), vision=("vision_tower", "multi_modal_projector"),
                     turn_end="<end_of_turn>", vision_tokens=GEMMA_VISION, images="fixed", positions="text",
                     bidirectional_images=True, keys=GEMMA_KEYS),
}


def layer_kinds(text_config):
    """The kinds of attention layer a text config has (full, sliding, linear, ...)."""
    return set(getattr(text_config, "layer_types", None) or ["full_attention"])


def unsupported(config):
    """Why a model of this config cannot be trained here, in one line, or None. Its family must be
    in FAMILIES; its layers full attention, or sliding-window attention where positions are 1-D
    (Gemma 3: the sampler and the scorer build the window into their masks by rotary position,
    VLM.attention_masks), or linear attention in a recurrent family (Qwen3.5); its output layer
    plain: the hand-written one (OutputLayer) computes softmax(h W^T / T), and a softcapped head
    (tanh on the logits) would need its own derivative."""
    if config.model_type not in FAMILIES:
        return (f"model type {config.model_type!r} is not supported; the families trained here: "
                f"{', '.join(sorted(FAMILIES))} (README, Model families)")
    text = config.get_text_config()
    family, supported = FAMILIES[config.model_type], {"full_attention"}
    if family.positions == "text":  # a window counts 1-D positions
        supported.add("sliding_attention")
    if family.recurrent:
        supported.add("linear_attention")
    if not layer_kinds(text) <= supported:
        return (f"layers of kind {sorted(layer_kinds(text) - supported)} are not supported for {config.model_type} "
                "(set use_sliding_window false in its config.json, if it has it)")
    if getattr(text, "final_logit_softcapping", None) is not None:
        return (f"final_logit_softcapping {text.final_logit_softcapping} is not supported by the hand-written "
                "output layer (METHOD.md 5.5)")
    return None


def fsdp_units(model):
    """The modules FSDP shards one by one: every decoder layer, then every vision block (by the
    family's class names, in the model's order)."""
    names = FAMILIES[model.config.model_type].units
    return [m for name in names for m in model.modules() if type(m).__name__ == name]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN_VISION]
# Whole-word tokens of the answer templates, so the tiny model writes "<answer>" in one step.
TEMPLATE_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ROPE_THETA = 20.0  # tiny model only; see build_tiny_model
PATCH = 14  # the tiny model's vision patch (Qwen2/2.5-VL's); a loaded model's processor says its own
# The tiny model after SFT on synth:mix, shipped so that every machine starts GRPO from the same
# weights (a long SFT phase carries float differences between CPUs to different models).
TINY_WARM_START = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-warmstart")
# Logit elements per chunk when scoring tokens: 16 M floats (64 MB), about 110 positions of a
# 151,936-token vocabulary, and the whole batch at once for the tiny one.
LOGIT_CHUNK = 2 ** 24
# glibc's mallopt parameters (malloc.h): reuse_freed_memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# The sampler's static KV cache is a multiple of this long: prompts of different lengths then share
# a few shapes, and so a few compilations of the decoding step under --compile.
CACHE_BLOCK = 128

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def reuse_freed_memory():
    """Let the C allocator keep freed blocks of up to 1 GiB for reuse (train.py and bench.py's timings).
    By default glibc maps each block over 32 MB afresh and unmaps it when freed, so every logit
    chunk (64 MB, several per chunk of positions) pays a page fault per 4 KB page: 30-40 % of a
    chunk's time on this CPU. The process then keeps up to 1 GiB of freed memory. Linux with glibc
    only; elsewhere allocation stays as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
    libc.mallopt(M_MMAP_THRESHOLD, 2 ** 30)


# ----------------------------------------------------------------------------- the tiny model
def char_tokenizer(special, vocab_size=None, bos_token=None, **named):
    """A character-level tokenizer made in code (no files): the `special` tokens, the answer
    template's words, then every printable character. `vocab_size` pads the vocabulary with unused
    tokens, e.g. to Qwen's 151,936, so a test or benchmark model has real-sized embeddings and
    logits; a `bos_token` is put before every text, as Gemma's tokenizer does; `named`: the
    tokenizer's named tokens (eos_token=..., pad_token=...)."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    words = special + TEMPLATE_TOKENS + ["<unk>"] + chars
    words += [f"<|unused_{i}|>" for i in range((vocab_size or 0) - len(words))]
    vocab = {tok: i for i, tok in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos_token is not None:
        core.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A",
                                                            special_tokens=[(bos_token, vocab[bos_token])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=bos_token, **named)
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.add_tokens(TEMPLATE_TOKENS)  # matched whole before the character split
    return tok


def build_tiny_tokenizer(vocab_size=None):
    """The tiny model's tokenizer: characters, with the Qwen special tokens and chat format."""
    tok = char_tokenizer(SPECIAL_TOKENS, vocab_size, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_processor(tokenizer, min_pixels, max_pixels):
    """A real Qwen2.5-VL processor around the tiny tokenizer, with a fixed pixel budget."""
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(),
                               chat_template=TINY_CHAT_TEMPLATE)


def build_tiny_model(tokenizer, hidden=128, layers=4, vision_hidden=64, seed=0):
    """A ~1.3 M parameter Qwen2_5_VLForConditionalGeneration built from a config, random init.

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
        problem = unsupported(model.config)
        if problem:
            raise ValueError(problem)
        self.model, self.processor = model, processor
        self.amp_dtype = amp_dtype  # bf16 autocast over fp32 weights ("bf16-mixed"), or None
        self.adapters_off = False   # True for the KL reference of a LoRA policy: same model, no adapters
        self.base_name = None       # what LoRA adapters are trained on (written into adapter_config.json)
        self.published_dtype = None  # the dtype its folder was published in: final/'s default (load_vlm sets it)
        self.run_fields = {}        # what the run writes into config.json: the task's (tasks.of_config reads
                                    # them back) and the completion length eval.py decodes to
        self.family = FAMILIES[model_type]
        self.coord = self.family.coord
        self.patch = getattr(processor.image_processor, "patch_size", None)  # pixels per side of a grid cell
        self.cache_arg = cache_arg(self.language_model)
        self.template = template or getattr(model.config, "medloc_template", "r1")
        self.is_tiny = bool(getattr(model.config, "medloc_tiny", False))
        tok = processor.tokenizer
        tok.padding_side = "left"  # generation appends on the right
        # every stop token of the checkpoint (Qwen Instruct: <|im_end|> and <|endoftext|>), end of
        # turn first: it is the token an SFT answer ends with
        stops = model.generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        self.eos_ids = list(dict.fromkeys(i for i in [tok.convert_tokens_to_ids(self.family.turn_end),
                                                      tok.eos_token_id, *stops] if i is not None))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        vocab = tok.get_vocab()  # a tokenizer may have fewer tile tokens than SMOLVLM_VISION names
        self.suppress_ids = torch.tensor([vocab[t] for t in self.family.vision_tokens if t in vocab])
        self.tile_ids = {vocab[t]: tuple(map(int, re.findall(r"\d+", t))) for t in self.family.vision_tokens
                         if t in vocab and t.startswith("<row_")}  # token id -> (row, column) of a tile
        text = model.config.get_text_config()
        self.window = text.sliding_window if "sliding_attention" in layer_kinds(text) else None

    @property
    def device(self):
        return self.model.device

    @property
    def language_model(self):
        """The body's language model (decoding runs it alone): `language_model`, SmolVLM's `text_model`."""
        return getattr(self.model.model, self.family.text)

    @contextlib.contextmanager
    def context(self):
        """Every forward runs here: bf16 autocast for bf16-mixed, and for a LoRA reference the
        adapters switched off (the starting policy, METHOD.md section 5.3)."""
        off = lora.disabled(self.model) if self.adapters_off else contextlib.nullcontext()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None), off:
            yield

    def encode(self, images, prompts):
        """Processor batch (left-padded) for one chat turn per (image, prompt text) pair."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        # the rendered template is the whole text: Gemma's tokenizer would add a second <bos>; one
        # image per prompt, as a list of its own (Gemma 3's processor wants a list per prompt)
        batch = self.processor(text=texts, images=[[image] for image in images], padding=True,
                               add_special_tokens=False, return_tensors="pt")
        return batch.to(self.device)

    def input_sizes(self, batch):
        """(width, height) of each processor-resized image (METHOD.md section 2): grid_thw times the
        patch (14 for Qwen2/2.5-VL, 16 for Qwen3-VL), the one size a "fixed" family resizes to, or a
        "tiles" family's grid of tiles (a single tile when the image is not split)."""
        if self.family.images == "fixed":
            size = self.processor.image_processor.size
            return [(size["width"], size["height"])] * len(batch["input_ids"])
        if self.family.images == "tiles":  # resized to rows x cols whole tiles: its <row_r_col_c> tokens count them
            side = batch["pixel_values"].shape[-1]
            grids = [[self.tile_ids.get(i, (1, 1)) for i in set(row.tolist())] for row in batch["input_ids"]]
            return [(side * max(c for _, c in grid), side * max(r for r, _ in grid)) for grid in grids]
        return [(int(w) * self.patch, int(h) * self.patch) for _, h, w in batch["image_grid_thw"].tolist()]

    def vision_inputs(self, batch):
        """The processor's image inputs the model's forward takes: the pixels and Qwen's grid; the
        token types tell Gemma 3 which tokens form an image (bidirectional there: its prefill);
        SmolVLM's pixel mask, which parts of a tile are image."""
        names = ("pixel_values", "image_grid_thw", "token_type_ids", "pixel_attention_mask")
        return {k: batch[k] for k in names if k in batch}

    # ------------------------------------------------------------------ the policy distribution
    def policy_logprobs(self, logits, temperature, sampling=True):
        """log pi(. | context) over the vocabulary, float32 (METHOD.md section 5).

        The policy is the model's softmax at the rollout temperature T with the vision special
        tokens removed: that is the distribution the sampler draws from, so the same function
        scores the ratio and the KL. sampling=False: the model's plain softmax (the SFT loss)."""
        logits = logits.float() / temperature  # a new tensor: filling it in place is safe for autograd
        if sampling:
            logits.index_fill_(-1, self.suppress_ids.to(logits.device), float("-inf"))
        return logits.log_softmax(-1)

    def prompt_positions(self, batch):
        """Rotary positions of the left-padded prompts, (3, B, L) for Qwen's multimodal rope and
        (B, L) for a "text" family, and the next free position (B,).

        Qwen's multimodal rope gives the image tokens (t, h, w) positions, so text after an image
        continues from max(position) + 1, not from the token count (METHOD.md section 5); a text
        family counts the real tokens, padding left out."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.family.positions == "text":
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return positions, positions[:, -1] + 1
        types = batch.get("mm_token_type_ids")
        if types is None:  # older processors: image placeholders are type 1, everything else text
            types = (ids == self.model.config.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                       image_grid_thw=batch["image_grid_thw"],
                                                       attention_mask=mask)
        return positions, positions.amax(dim=(0, 2)) + 1

    # ------------------------------------------------------------------ sampling primitives
    @torch.no_grad()
    def prefill(self, batch, copies, max_new_tokens):
        """Vision encoder and prompt once per prompt; the KV cache is then copied `copies` times
        into a static cache with room for `max_new_tokens` more tokens per row.

        Returns the decoding state and the next-token logits (B*copies, V), rows prompt after
        prompt. grpo.sample_groups decodes from here, one token at a time with `decode_step`."""
        positions, start = self.prompt_positions(batch)
        with self.context():
            # a cache that keeps every key (a sliding layer's own would keep only its window; the
            # decoding masks apply the window); a recurrent family's linear layers keep their state
            cache = DynamicCache(config=self.model.config.get_text_config()) if self.family.recurrent else DynamicCache()
            out = self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=positions, **self.vision_inputs(batch), use_cache=True,
                                   **{self.cache_arg: cache})
            prompt_cache = getattr(out, self.cache_arg)
            logits = self.model.lm_head(out.last_hidden_state[:, -1])
        B, L = batch["input_ids"].shape
        length = -(-(L + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK
        mask = batch["attention_mask"].new_zeros(B * copies, length, dtype=torch.bool)  # columns not yet written: 0
        mask[:, :L] = batch["attention_mask"].bool().repeat_interleave(copies, 0)
        state = {"cache": self.static_cache(prompt_cache, copies, length), "mask": mask, "length": L,
                 "next": start.repeat_interleave(copies)}
        if self.window is not None:  # each column's rotary position, for the sliding window
            state["positions"] = torch.zeros(B * copies, length, dtype=torch.long, device=mask.device)
            state["positions"][:, :L] = positions.repeat_interleave(copies, 0)
        return state, logits.float().repeat_interleave(copies, 0)

    def static_cache(self, prompt_cache, copies, length):
        """The prompts' KV cache, each row copied `copies` times (the G rows of a group share one
        prefill), in a cache preallocated to `length` positions: decoding then writes each token
        into its column in place, and every step has the same shapes (what --compile needs)."""
        cache = Cache(layers=[copied_state(prompt, copies) if isinstance(prompt, LinearAttentionCacheLayerMixin)
                              else StaticLayer(max_cache_len=length) for prompt in prompt_cache.layers])
        for static, prompt in zip(cache.layers, prompt_cache.layers):
            if not isinstance(static, StaticLayer):  # a linear layer's state, copied already
                continue
            keys, values = prompt.keys.repeat_interleave(copies, 0), prompt.values.repeat_interleave(copies, 0)
            # each in its own dtype: under bf16 autocast the keys come out of the rotary embedding
            # in float32 and the values out of a bf16 matmul. Transformers before 5.2x keep both of
            # the prompt's in the keys' dtype (its values exact bf16 numbers) and size a static
            # layer's values by the keys too: the values are put back in the dtype decoding writes.
            values = values.to(self.amp_dtype or values.dtype)
            static.lazy_initialization(keys[:, :, :0], values[:, :, :0])
            if static.values.dtype != values.dtype:
                static.values = torch.zeros_like(static.values, dtype=values.dtype)
                torch._dynamo.mark_static_address(static.values)  # as lazy_initialization marks its own
            L = keys.shape[2]
            static.keys[:, :, :L] = keys
            static.values[:, :, :L] = values
            static.cumulative_length.fill_(L)
        return cache

    @torch.no_grad()
    def decode_step(self, state, tokens):
        """Feed one token per row (N,) and return the next-token logits (N, V). The token goes
        into the cache's next free column, which the rows' attention mask opens."""
        n, column = tokens.shape[0], state["length"]
        state["mask"][:, column] = True
        state["length"] += 1
        query = state["next"].view(n, 1)
        state["next"] = state["next"] + 1
        if self.window is not None:
            state["positions"][:, column] = query[:, 0]
        masks = self.attention_masks(state["mask"][:, None, None], query[:, None, :, None],
                                     state.get("positions", state["mask"])[:, None, None])
        positions = query if self.family.positions == "text" else query[None].expand(3, n, 1)
        return self.next_logits(tokens, positions, masks, state["cache"])

    def next_logits(self, tokens, positions, mask, cache):
        """The language model on one token per row: next-token logits (N, V), float32. With
        --compile this is what torch.compile runs (`compile_decoding`)."""
        with self.context():
            out = self.language_model(input_ids=tokens[:, None], position_ids=positions, attention_mask=mask,
                                      use_cache=True, **{self.cache_arg: cache})
            return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def compile_decoding(self):
        """--compile: the decoding step through torch.compile (one graph: every step has the same
        shapes). The first rollout pays for the compilation."""
        self.next_logits = torch.compile(self.next_logits, dynamic=False)

    def decode(self, completion_ids):
        return self.processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def completion_logps(self, batch, completion_ids, temperature=1.0, mask=None, sampling=True):
        """log pi(token) of each completion token (N, T), float32, each prompt computed once; 0
        where `mask` is 0. A score, without gradient: the loss goes through `completion_loss`."""
        hidden, targets, mask = self.completion_hidden(batch, completion_ids, mask)
        logps = [self.chunk_logps(h, y, temperature, sampling)[0] for h, y in self.chunks(hidden, targets)]
        return torch.zeros(mask.shape, device=hidden.device).masked_scatter(
            mask, torch.cat(logps or [hidden.new_zeros(0, dtype=torch.float32)]))  # nothing scored: all 0

    def completion_loss(self, batch, completion_ids, objective, temperature=1.0, mask=None, sampling=True):
        """sum_t objective(log pi(token_t)) over the completion tokens where `mask` is 1, and the
        log-probs (N, T) of `completion_logps`. The output layer takes the loss's gradient as it
        goes (`OutputLayer`): backward() on the loss runs the rest of the model's backward.
        `objective(logp, start, stop)`: the loss of the scored tokens start:stop (grpo.objective)."""
        hidden, targets, mask = self.completion_hidden(batch, completion_ids, mask)
        loss, logps = OutputLayer.apply(hidden, self.model.lm_head.weight, targets, self, temperature, sampling,
                                        objective)
        return loss, torch.zeros(mask.shape, device=hidden.device).masked_scatter(mask, logps)

    def completion_hidden(self, batch, completion_ids, mask=None):
        """The final hidden state (M, H) that predicts each completion token where `mask` is 1
        (row-major), those M tokens, and the mask as booleans (N, T). `batch` holds B prompts and
        `completion_ids` their N = B*G completions, group after group."""
        mask = torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask.bool()
        hidden = (self.row_hidden if self.family.recurrent else self.group_hidden)(batch, completion_ids)
        return hidden[mask], completion_ids[mask], mask

    def group_hidden(self, batch, completion_ids):
        """The final hidden state (N, T, H) before each completion token, each prompt computed once.

        One row per group: [prompt | completion 1 | ... | completion G] with an attention mask
        that lets every completion see the prompt and its own earlier tokens only, and the same
        rotary positions each completion would have alone. The vision encoder and the prompt
        tokens run once per group and their gradient is the sum over the G completions: the same
        numbers as G separate forwards."""
        B, L = batch["input_ids"].shape
        N, T = completion_ids.shape
        G = N // B
        body = completion_ids[:, :-1].reshape(B, G * (T - 1))  # (B, G*(T-1)); the last token predicts nothing
        positions, start = self.prompt_positions(batch)  # (3, B, L) or (B, L), (B,)
        block = (start[:, None] + torch.arange(T - 1, device=start.device)).repeat(1, G)  # (B, G*(T-1))
        positions = torch.cat([positions, block.expand(*positions.shape[:-1], -1)], -1)  # (.., B, L + G*(T-1))
        with self.context():
            hidden = self.model.model(input_ids=torch.cat([batch["input_ids"], body], 1),
                                      attention_mask=self.group_mask(batch, G, T - 1, positions),
                                      position_ids=positions, **self.vision_inputs(batch),
                                      use_cache=False).last_hidden_state
        # hidden: (B, L + G*(T-1), H). Token t of completion g is predicted by the prompt's last
        # position for t = 0, else by position L + g*(T-1) + (t-1) of the row
        t = torch.arange(T, device=hidden.device)  # (T,)
        source = torch.where(t == 0, L - 1, L + (t - 1).clamp(min=0))  # (T,) column in group 0
        source = (source[None] + (T - 1) * torch.arange(G, device=hidden.device)[:, None] * (t > 0))  # (G, T)
        return hidden[:, source.flatten()].reshape(N, T, -1)  # (B, G*T, H) -> (N, T, H), group after group

    def row_hidden(self, batch, completion_ids):
        """The final hidden state (N, T, H) before each completion token, each completion in a row
        of its own after its prompt, the prompt (and its image) repeated G times: a recurrent
        family's linear layers carry a state along the row, which no mask can share between
        completions (Family.recurrent). Left padding is exact there too: the model zeroes a padded
        token's input to its linear layers, so the state stays 0 until the prompt begins."""
        B, L = batch["input_ids"].shape
        N, T = completion_ids.shape
        rows = VLM.repeat_rows(batch, N // B)
        positions, start = self.prompt_positions(rows)  # (3, N, L), (N,)
        tail = start[:, None] + torch.arange(T - 1, device=start.device)  # each completion's own positions
        positions = torch.cat([positions, tail.expand(*positions.shape[:-1], -1)], -1)
        body = completion_ids[:, :-1]  # the last token predicts nothing
        with self.context():
            hidden = self.model.model(input_ids=torch.cat([rows["input_ids"], body], 1),
                                      attention_mask=torch.cat([rows["attention_mask"], torch.ones_like(body)], 1),
                                      position_ids=positions, **self.vision_inputs(rows),
                                      use_cache=False).last_hidden_state
        return hidden[:, L - 1:]  # column L - 1 + t predicts token t

    def group_mask(self, batch, copies, length, positions):
        """The attention mask (B, 1, S, S) of a [prompt | copies x completion] row (a dict of them,
        one per kind of layer, for a family with sliding-window layers: `attention_masks`).

        Query q may see key k when k <= q, k is a real (not padding) token, and k is in the prompt
        or in q's own completion; in Gemma 3 the tokens of one image also see each other, later
        ones included. Every token sees itself, so padding rows stay finite. `positions`: the
        row's rotary positions, by which a sliding window counts."""
        prompt_mask = batch["attention_mask"]
        B, L = prompt_mask.shape
        S = L + copies * length
        dev = prompt_mask.device
        segment = torch.cat([torch.zeros(L, dtype=torch.long, device=dev),
                             torch.arange(1, copies + 1, device=dev).repeat_interleave(length)])
        index = torch.arange(S, device=dev)
        visible = ((index[None, :] <= index[:, None]) & (
            (segment[None, :] == 0) | (segment[None, :] == segment[:, None])))[None]
        if self.family.bidirectional_images:
            image = batch["token_type_ids"] == 1  # (B, L), one image per prompt: one block of tokens
            image = torch.cat([image, image.new_zeros(B, S - L)], 1)
            visible = visible | (image[:, :, None] & image[:, None, :])
        real = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, S - L, dtype=torch.bool)], 1)
        allowed = (visible & real[:, None, :]) | torch.eye(S, dtype=torch.bool, device=dev)
        text = positions if positions.dim() == 2 else positions[0]  # a window counts text positions
        return self.attention_masks(allowed[:, None], text[:, None, :, None], text[:, None, None, :])

    def attention_masks(self, allowed, query, keys):
        """The model's attention masks from a 4-D boolean one (True: may attend): the same for
        every layer, or with sliding-window layers {"full_attention": ..., "sliding_attention": ...},
        the latter also hiding keys `window` or more positions before the query (rotary positions
        `query` and `keys`, broadcast against `allowed`): Gemma 3's window, which a completion
        laid out after the other completions of its group keeps by position, not by column."""
        if self.window is None:
            return self.attention_form(allowed)
        return {"full_attention": self.attention_form(allowed),
                "sliding_attention": self.attention_form(allowed & (keys > query - self.window))}

    def attention_form(self, allowed):
        """A 4-D boolean mask (True: may attend) as the model's attention takes it, which then uses
        it as it is: booleans for sdpa, 0 / -inf added to the scores for eager."""
        attention = self.model.config.get_text_config()._attn_implementation
        if attention == "eager":
            return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))
        if attention != "sdpa":  # flash attention would ignore the mask and mix the completions
            raise ValueError(f"scoring with a shared prompt needs sdpa or eager attention, not {attention}")
        return allowed

    def chunks(self, hidden, targets):
        """Slices of LOGIT_CHUNK logits: the logits of a chunk exist only while it is scored."""
        rows = max(1, LOGIT_CHUNK // self.model.lm_head.out_features)
        return [(hidden[s:s + rows], targets[s:s + rows]) for s in range(0, hidden.shape[0], rows)]

    def chunk_logps(self, h, y, temperature, sampling):
        """(log pi(y) (n,), log pi over the vocabulary (n, V)) of one chunk of positions."""
        with self.context():
            logits = self.model.lm_head(h)
        logp = self.policy_logprobs(logits, temperature, sampling)
        return logp.gather(-1, y[:, None])[:, 0], logp

    @staticmethod
    def select_rows(batch, start, end):
        """Rows start:end of a processor batch (Qwen's pixel_values hold t*h*w patch rows per image,
        a "fixed" family's one image each)."""
        if "image_grid_thw" not in batch:
            return {k: v[start:end] for k, v in batch.items()}
        offsets = [0] + list(accumulate(batch["image_grid_thw"].prod(-1).tolist()))
        rows = {k: v[start:end] for k, v in batch.items() if k != "pixel_values"}
        rows["pixel_values"] = batch["pixel_values"][offsets[start]:offsets[end]]
        return rows

    @staticmethod
    def repeat_rows(batch, copies):
        """The processor batch with every prompt repeated `copies` times (its image's pixels too)."""
        parts = [VLM.select_rows(batch, i, i + 1) for i in range(batch["input_ids"].shape[0]) for _ in range(copies)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @staticmethod
    def concat_batches(batches, pad_id):
        """Processor batches one after the other, as one batch: the shorter ones left-padded to the
        longest (pad_id, attention 0, token type 0), as the processor pads its prompts; the images'
        pixels and grids in the same order, a "tiles" family's tiles padded with all-zero ones (which
        its vision tower skips) as its processor pads a prompt with fewer tiles."""
        length = max(b["input_ids"].shape[1] for b in batches)
        fill = {"input_ids": pad_id}  # the rest (attention mask, token types): 0
        tiles = max(b["pixel_values"].shape[1] for b in batches) if "pixel_attention_mask" in batches[0] else 0

        def padded(key, t):
            if key in ("pixel_values", "pixel_attention_mask") and tiles:  # (B, tiles, ...): more tiles of zeros
                return torch.cat([t, t.new_zeros(t.shape[0], tiles - t.shape[1], *t.shape[2:])], 1)
            if key == "pixel_values" or key == "image_grid_thw":
                return t
            return torch.nn.functional.pad(t, (length - t.shape[1], 0), value=fill.get(key, 0))
        return {k: torch.cat([padded(k, b[k]) for b in batches]) for k in batches[0]}

    def frozen_copy(self):
        """A frozen reference policy (METHOD.md section 5, the KL anchor). With LoRA adapters it
        is the same model with the adapters off: no second copy in memory."""
        ref = copy.copy(self)
        if lora.layers(self.model):
            ref.adapters_off = True
            return ref
        ref.model = copy.deepcopy(self.model)
        return ref.freeze()

    def freeze(self):
        """This policy as a reference: no gradients, eval mode, and the policy's own precision.
        Under bf16-mixed that means fp32 weights under bf16 autocast, not a bf16 copy: the norms,
        embeddings and residual sums then compute the same function as the policy's, so the KL is
        exactly 0 while the policy equals its reference (a bf16 copy gave 1.2e-4 at step 1). It
        costs the reference fp32 memory (7.5 GB more for 3B); LoRA's reference costs nothing."""
        self.model.eval().requires_grad_(False)
        return self

    def save(self, folder, state=None, dtype=None, weights=True):
        """save_pretrained folder (safetensors + processor) that `load_vlm(folder)` reads back;
        with LoRA adapters, the adapters alone in PEFT's layout (on top of `self.base_name`).
        `state`: the whole weights of a sharded model (dist.full_state), else the model's own;
        `dtype`: the floating-point dtype to write them in (default: as they are); `weights=False`:
        the config and processor alone (a sharded checkpoint keeps its weights elsewhere)."""
        for key, value in {"medloc_template": self.template, **self.run_fields}.items():
            setattr(self.model.config, key, value)
        if not weights:  # the config (in `dtype`, the weights' dtype when written elsewhere) and stop tokens
            self.model.config.save_pretrained(folder)
            self.model.generation_config.save_pretrained(folder)
            if dtype is not None:
                set_config_dtype(folder, dtype)
        elif lora.layers(self.model):
            lora.save(self.model, folder, self.base_name)
            self.model.config.save_pretrained(folder)  # the task fields, for eval.py and resume
        elif dtype is None or dtype == next(self.model.parameters()).dtype:
            self.model.save_pretrained(folder, state_dict=state)
        else:  # e.g. bf16 for a model published in bf16, trained with fp32 masters
            state = {k: v.to(dtype) if v.is_floating_point() else v
                     for k, v in (state or self.model.state_dict()).items()}
            self.model.save_pretrained(folder, state_dict=state)
            set_config_dtype(folder, dtype)  # save_pretrained wrote the live weights' dtype
        self.processor.save_pretrained(folder)


def copied_state(layer, copies):
    """A linear-attention layer's cache (its conv and recurrent states) with each row copied
    `copies` times: the G completions of a group start from their prompt's state."""
    copied = LinearAttentionLayer(number_of_states=layer.number_of_states)
    for i in range(layer.number_of_states):
        conv, state = (s[i].repeat_interleave(copies, 0) for s in (layer.conv_states, layer.recurrent_states))
        copied.lazy_initialization(conv_states=conv, recurrent_states=state, state_idx=i)
        copied.conv_states[i].copy_(conv)
        copied.recurrent_states[i].copy_(state)
        copied.has_previous_state[i] = True
    return copied


def set_config_dtype(folder, dtype):
    """The dtype a folder's config.json states for its weights."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


class OutputLayer(torch.autograd.Function):
    """The output layer, log-softmax and a loss of the log-probs (`VLM.completion_loss`), chunk by
    chunk of positions, with the loss's gradient taken in the forward: each chunk's logits exist
    once, and never all of them at the same time (no (M, vocab) tensor, whatever the vocabulary).

    A token's loss depends on its own log-prob alone (the GRPO ratio, clip and KL are per token), so
    its gradient g = d loss / d log pi(y) is known as soon as the chunk is; with
    d log pi(y) / d logits = (onehot(y) - pi) / T, the chunk then gives dX = (g (onehot - pi) / T) W,
    kept for the backward, and dW += (g (onehot - pi) / T)^T X, added straight into weight.grad (in
    the weight's dtype: float32 masters under bf16-mixed). The backward only hands dX to the rest of
    the model. Because dW is already in place, the loss must be backpropagated as it is, unscaled."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, policy, temperature, sampling, objective):
        hidden = hidden.detach()  # a view of a grad-requiring tensor confuses module hooks
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        if weight.requires_grad and weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        loss, logps, start = torch.zeros((), device=hidden.device), [], 0
        for h, y in policy.chunks(hidden, targets):
            logp_y, logp = policy.chunk_logps(h, y, temperature, sampling)
            with torch.enable_grad():  # the loss of each token, and its gradient g (n,)
                leaf = logp_y.detach().requires_grad_()
                value = objective(leaf, start, start + len(y)).sum()
                g, = torch.autograd.grad(value, leaf)
            rows, scale = torch.arange(len(y), device=y.device), g[:, None] / temperature
            d_logits = logp.exp_()                                         # pi, in place: (n, V) float32
            pi_y = d_logits[rows, y]
            d_logits *= -scale                                             # -pi g / T
            d_logits[rows, y] = (1 - pi_y) * scale[:, 0]                   # (onehot(y) - pi) g / T
            if grad_hidden is not None:
                with policy.context():
                    grad_hidden[start:start + len(y)] = d_logits.to(weight.dtype) @ weight
            if weight.requires_grad:
                weight.grad.addmm_(d_logits.T.to(weight.dtype), h.to(weight.dtype))
            loss += value.detach()
            logps.append(logp_y)
            start += len(y)
        ctx.save_for_backward(grad_hidden)
        logps = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _):
        if grad_loss.item() != 1.0:  # dW went into weight.grad unscaled in the forward
            raise RuntimeError(f"completion_loss: backpropagate the loss as it is (got a gradient of "
                               f"{grad_loss.item()}; scale the objective instead)")
        grad_hidden, = ctx.saved_tensors
        return grad_hidden, None, None, None, None, None, None


def check_processor(processor):
    """Render one prompt now: a chat template that fails (or that the jinja sandbox stops) is a
    one-line error at load time, not a traceback at the first step. Gemma 3's pan and scan would
    crop an image into several (several image blocks a prompt): the prompts here hold one image."""
    processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
                                  tokenize=False, add_generation_prompt=True)
    if getattr(processor.image_processor, "do_pan_and_scan", None):
        raise ValueError("the image processor's do_pan_and_scan is on: one image per prompt is what is scored here; "
                         "set it false in its processor config")


PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
              "bf16-mixed": (torch.float32, torch.bfloat16)}


def model_config(name):
    """The config of a folder or hub id (its model_type says the family), or a one-line ValueError
    saying what `name` is instead."""
    if os.path.isdir(os.path.join(name, "final")) or glob.glob(os.path.join(name, "checkpoint-*", "model")):
        raise ValueError(f"{name} is a training run folder, not a model folder: did you mean "
                         f"{os.path.join(name, 'final')} (or a checkpoint's model/ folder)?")
    try:
        # trust_remote_code=False: a folder whose config names custom code is refused, never run
        # (left unset, transformers would ask on a terminal)
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except OSError as e:  # missing folder, bad hub id, no network; a folder's unreadable config.json
        hub = "" if os.path.isdir(name) else ", and not loadable as a hub id"
        raise ValueError(f"{name}: not a model folder{hub} ({first_line(e)})")
    except ValueError as e:  # a config.json without a model_type, or broken JSON
        raise ValueError(f"{name}: not a model folder ({first_line(e)})")


def unloadable(name, e):
    return ValueError(f"{name}: cannot be loaded ({type(e).__name__}: {first_line(e)})")


def cache_arg(module):
    """The name under which a transformers model takes its KV cache and returns it in its output:
    `cache` from transformers 5.2x on, `past_key_values` in the 5.x releases before (5.17 on the
    GPU nodes seen)."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def checkpoint_activations(model):
    """Activation checkpointing: `activation_checkpointing_enable` where transformers has it (5.2x;
    `gradient_checkpointing_enable` is now its deprecated alias), else the older name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # training forwards pass use_cache=False themselves


def training_setup(model, gradient_checkpointing, freeze_vision):
    """Activation checkpointing on, the vision tower frozen: what --gradient-checkpointing and --freeze-vision ask."""
    if gradient_checkpointing:
        checkpoint_activations(model)
    if freeze_vision:
        for name in FAMILIES[model.config.model_type].vision:
            getattr(model.model, name).requires_grad_(False)


@contextlib.contextmanager
def weights_on_meta():
    """Modules built inside get their parameters on the meta device (shapes, no memory) and their
    buffers as usual: the rotary frequencies are computed when a model is built, no file holds them.
    A layer makes its weight with torch.empty and then fills it: `torch.empty` itself is sent to
    meta (else a 7B model would reserve each weight in turn, and fail under a job's memory cap);
    the few small parameters made otherwise (a norm's torch.ones) move there when registered."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:  # a meta one is passed on as it is: tying shares it
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        with EmptyOnMeta():
            yield
    finally:
        torch.nn.Module.register_parameter = register


class EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """torch.empty without a device of its own makes a meta tensor (weights_on_meta)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def model_key(key, keys):
    """A weight's name in a folder -> its name in the model, by the family's `keys` (file prefix,
    model prefix): a name already the model's stays as it is (QWEN_KEYS, GEMMA_KEYS)."""
    if key.startswith(tuple(inside for _, inside in keys)):
        return key
    return next((inside + key[len(stored):] for stored, inside in keys if key.startswith(stored)), key)


def file_key(name, keys):
    """A weight's name in the model -> its name in a save_pretrained folder (model_key's inverse)."""
    return next((stored + name[len(inside):] for stored, inside in keys if name.startswith(inside)), name)


def weight_files(name):
    """The safetensors files of a folder or hub id (downloaded to the hub cache like from_pretrained)."""
    folder = name if os.path.isdir(name) else snapshot_download(name, allow_patterns=["*.safetensors", "*.json"])
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"{name}: --fsdp loads safetensors weights one tensor at a time, and this folder has none")
    return folder, files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """(name, shape, read) for each tensor of a .safetensors file, where read(start, stop) returns
    its rows start:stop (dim 0; all of a scalar) in memory of their own. Each rank reads only the
    rows it keeps. Not through a memory map: every rank touches every tensor, and a mapped file
    stays in each process's resident memory until closed (the whole model, on every rank)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")  # the format: header length, JSON header, raw bytes
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        data = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if os.path.getsize(path) < 8 + size + data:  # said before any rank reads: each reads different rows
            raise ValueError(f"{path}: truncated ({os.path.getsize(path)} bytes; "
                             f"its header describes {8 + size + data})")
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: weight {name} is stored as {entry['dtype']}, "
                                 "which this loader does not read")
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            row = (end - begin) // shape[0] if shape and shape[0] else end - begin  # bytes per dim-0 row

            def read(start=0, stop=None, shape=shape, begin=begin, row=row, dtype=entry["dtype"], name=name):
                stop = (shape[0] if shape else 1) if stop is None else stop
                raw = torch.empty((stop - start) * row, dtype=torch.uint8)
                f.seek(8 + size + begin + start * row)
                if f.readinto(raw.numpy()) != raw.numel():
                    raise ValueError(f"{path}: ends in the middle of weight {name}")
                return raw.view(SAFETENSORS_DTYPES[dtype]).reshape([stop - start, *shape[1:]] if shape else [])
            yield name, shape, read


def rows_of_rank(n, param):
    """The dim-0 rows [start, stop) of an n-row tensor that this rank keeps of `param`, a DTensor
    split as FSDP2 splits every parameter: torch.chunk over the ranks of the mesh's last dimension
    (all ranks, or under --fsdp hybrid those of one copy), the last chunks short or empty."""
    if tuple(param.placements) not in ((Shard(0),), (Replicate(), Shard(0))):
        raise ValueError(f"a parameter split as {param.placements}: expected FSDP2's Shard(0)")
    mesh, dim = param.device_mesh, param.device_mesh.ndim - 1
    per = -(-n // mesh.size(dim))
    start = min(mesh.get_local_rank(dim) * per, n)
    return start, min(start + per, n)


def load_sharded(model_cls, config, name, dtype, compute_dtype, device, shard, gradient_checkpointing, freeze_vision):
    """The model of `name`, split by `shard` before any weight exists, then filled one tensor at a
    time: each process reads only the rows it keeps (and the whole output layer, which every rank
    keeps), never the whole model (METHOD.md section 5.4)."""
    with weights_on_meta():
        model = model_cls._from_config(config, dtype=dtype)
    training_setup(model, gradient_checkpointing, freeze_vision)
    shard(model, compute_dtype)  # FSDP2 splits meta parameters as real ones; the buffers go to the device
    # every name a parameter goes by (the tied output layer and input embeddings are one tensor)
    names = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(key)
    owners = {key: keys for keys in names.values() for key in keys}
    folder, files = weight_files(name)
    # what from_pretrained skips too (Qwen3.5's multi-token-prediction layer: the model has none)
    skipped = [re.compile(p) for p in getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or []]
    for path in files:
        for stored, shape, read in read_safetensors(path):
            key = model_key(stored, FAMILIES[config.model_type].keys)
            if any(p.search(stored) for p in skipped):
                continue
            if key not in owners:
                raise ValueError(f"{path}: weight {stored} belongs to no parameter of {model_cls.__name__}")
            old = model.get_parameter(key)
            if list(shape) != list(old.shape):
                raise ValueError(f"{path}: weight {stored} has shape {shape}, the model's is {list(old.shape)}")
            if isinstance(old, DTensor):  # this rank's rows only
                local = read(*rows_of_rank(shape[0], old)).to(device=device, dtype=dtype)
                value = DTensor.from_local(local, old.device_mesh, old.placements, run_check=False,
                                           shape=old.shape, stride=old.stride())
            else:
                value = read().to(device=device, dtype=dtype)
            new = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            for alias in owners[key]:
                module, _, leaf = alias.rpartition(".")
                model.get_submodule(module).register_parameter(leaf, new)
    missing = [key for key, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{name}: its weight files have no {missing[0]} (and {len(missing) - 1} more)")
    if os.path.isfile(os.path.join(folder, "generation_config.json")):  # its stop tokens
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()  # as from_pretrained returns it


def load_vlm(name, device="cpu", precision="auto", min_pixels=None, max_pixels=None,
             gradient_checkpointing=False, freeze_vision=False, template=None, seed=0, shard=None):
    """`tiny`, a hub id or a local folder -> VLM on `device`. `shard(model, compute_dtype)` (--fsdp:
    dist.shard) splits the model over the processes as it is loaded (`load_sharded`).

    precision "auto" is bf16-mixed on CUDA (fp32 weights, bf16 autocast: with lr 1e-6, pure bf16
    weights would round most updates away) and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16-mixed" if str(device).startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected auto or one of {sorted(PRECISIONS)}")
    dtype, amp_dtype = PRECISIONS[precision]
    if os.path.isfile(os.path.join(name, "adapter_config.json")):  # LoRA adapters on their base
        base = lora.base_of(name)
        if base != "tiny" and os.path.isfile(os.path.join(base, "adapter_config.json")):
            raise ValueError(f"{name}/adapter_config.json: field 'base_model_name_or_path' names adapters "
                             f"({base}), not a model")
        vlm = load_vlm(base, device, precision, min_pixels, max_pixels, gradient_checkpointing,
                       freeze_vision, template, seed, shard)
        lora.load(vlm.model, name)
        vlm.base_name = base
        saved = os.path.join(name, "config.json")  # the task the adapters were trained for
        if os.path.isfile(saved):
            with open(saved) as f:
                for key, value in json.load(f).items():
                    if key.startswith("medloc_") and key != "medloc_tiny":
                        setattr(vlm.model.config, key, value)
            vlm.template = template or vlm.model.config.medloc_template
        return vlm
    published = torch.float32  # the built-in model's; a folder says its own below
    if name == "tiny":
        tok = build_tiny_tokenizer()
        processor = build_tiny_processor(tok, min_pixels or 56 * 56, max_pixels or 112 * 112)
        model = build_tiny_model(tok, seed=seed)
    else:
        config = model_config(name)
        model_type = config.model_type
        problem = unsupported(config)
        if problem:
            raise ValueError(f"{name}: {problem}")
        model_cls, processor_cls = FAMILIES[model_type].model, FAMILIES[model_type].processor
        try:
            processor = processor_cls.from_pretrained(name, trust_remote_code=False)
            check_processor(processor)
        except Exception as e:  # missing or broken tokenizer files, a template that fails or the sandbox stops
            raise unloadable(name, e)
        published = config.dtype  # read before from_pretrained's dtype= overrides it
        try:
            if shard:
                model = load_sharded(model_cls, config, name, dtype, amp_dtype, device, shard,
                                     gradient_checkpointing, freeze_vision)
            else:
                model = model_cls.from_pretrained(name, dtype=dtype, trust_remote_code=False)
        except ValueError:  # load_sharded's own one-line messages
            raise
        except Exception as e:  # broken weight files, weights_only refusing a pickled .bin
            raise unloadable(name, e)
        if min_pixels or max_pixels:  # transformers 5 keeps the pixel budget in `size`
            size = processor.image_processor.size
            processor.image_processor.size = {"shortest_edge": min_pixels or size.shortest_edge,
                                              "longest_edge": max_pixels or size.longest_edge}
    if not shard or name == "tiny":  # load_sharded prepared and split the model as it loaded it
        model.to(device=device, dtype=dtype)
        training_setup(model, gradient_checkpointing, freeze_vision)
        if shard:  # the built-in tiny model: built whole (it is small), then split
            shard(model, amp_dtype)
    vlm = VLM(model, processor, template=template, amp_dtype=amp_dtype)
    vlm.published_dtype = published if isinstance(published, torch.dtype) else None
    return vlm
