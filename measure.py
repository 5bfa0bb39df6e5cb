"""The step measured: what bench.py (the command line) and gpu_check.py both use.

- The benchmark shapes (`SHAPES`, `SETTINGS`, `build`): the tiny model, a 123 M proxy with the real
  vocabulary, a clone whose output layer dominates, and the 3B / 7B / 32B dimensions.
- `Naive`, the straightforward path: every prompt repeated G times through the whole model when
  sampling and when scoring, with full (N, T, vocab) logits. The lean path (model.py) must compute
  what it computes (tests/test_step.py).
- Timing one GRPO step by phase (`step_runs`, `time_runs`), its FLOPs and utilisation (`step_flops`,
  `matmul_rate`), and the memory plan: each phase's expected peak from the shapes (`memory_plan`).
- Memory readers: this process's resident bytes (/proc), each timed phase's peak (`phase_peaks`).
Nothing here prints or parses flags.
"""
import contextlib
import copy
import statistics
import time
import types

import torch
from transformers import (Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Qwen2_5_VLConfig, Qwen2VLImageProcessor,
                          Qwen3_5Config, Qwen3VLConfig, Qwen3VLMoeConfig, Qwen3VLProcessor, SmolVLMConfig,
                          SmolVLMImageProcessor, SmolVLMProcessor)
from tokenizers.pre_tokenizers import ByteLevel
from transformers.models.qwen3_5 import Qwen3_5Tokenizer
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM_CHAT_TEMPLATE
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

import lora
import sampling
import start
import train
from config import Config
from data import load_dataset
from model import (CACHE_BLOCK, FAMILIES, GEMMA_VISION, LOGIT_CHUNK, PRECISIONS, SMOLVLM_VISION, SPECIAL_TOKENS,
                   TEMPLATE_TOKENS,
                   TINY_CHAT_TEMPLATE, VLM, build_tiny_model, layer_kinds,
                   build_tiny_processor, build_tiny_tokenizer, char_tokenizer, checkpoint_activations, load_vlm,
                   weights_on_meta)
from scheduler import make_schedule
from tasks import Grounding

# ----------------------------------------------------------------------------- the benchmark shapes
PHASES = ("rollout", "reward", "reference", "policy_forward", "backward", "optimizer")
# Shapes of the benchmark models. proxy: what a CPU can step in seconds with the real vocabulary
# and image-token count; clone: Qwen-shaped with the body small next to the output layer (hidden
# 256, 2 layers: the head is 6x the body per token); 3b: Qwen2.5-VL-3B-Instruct's config.json dimensions.
SMALL_VISION = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[3])
QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                    deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304)
QWEN3_5_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304)
SIGLIP_400M = dict(num_hidden_layers=27, hidden_size=1152, intermediate_size=4304, num_attention_heads=16)
GEMMA_VOCAB = 262_208  # Gemma 3's (MedGemma's) vocabulary
SMOLVLM_VOCAB = 49_280  # SmolVLM2's
QWEN3_5_VOCAB = 248_320  # Qwen3.5's
SHAPES = {
    "proxy": dict(hidden=512, layers=8, heads=4, kv_heads=2, mlp=1536, mrope=[16, 24, 24], theta=1e6,
                  vision=SMALL_VISION),
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, mlp=11008, mrope=[16, 24, 24], theta=1e6,
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31])),
    "clone": dict(hidden=256, layers=2, heads=2, kv_heads=2, mlp=1024, mrope=[16, 24, 24], theta=1e6,
                  vision=SMALL_VISION),  # the proxy's vision tower
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944, mrope=[16, 24, 24], theta=1e6,
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31])),
    "32b": dict(hidden=5120, layers=64, heads=40, kv_heads=8, mlp=27648, mrope=[16, 24, 24], theta=1e6, vocab=152_064,
                vision=dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16,
                            fullatt_block_indexes=[7, 15, 23, 31])),
    # Qwen3-VL-4B-Instruct's config.json: interleaved M-RoPE, head_dim 128 (32 x 128 != hidden 2560),
    # a vision tower of patch 16 in full attention with deepstack mergers after blocks 5, 11, 17
    "qwen3-vl-4b": dict(family="qwen3_vl", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728,
                        mrope=[24, 20, 20], theta=5e6,
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304)),
    # clones of the other families, shaped as "clone" (the output layer dominates): their lean step
    # against their straightforward one (python bench.py --model qwen3-clone --naive)
    "qwen3-clone": dict(family="qwen3_vl", hidden=256, layers=2, heads=2, kv_heads=2, head_dim=128, mlp=1024,
                        mrope=[16, 24, 24], theta=5e6, vision=dict(depth=4, hidden_size=256, intermediate_size=512,
                                                                   num_heads=4, deepstack_visual_indexes=[1])),
    "qwen3-moe-clone": dict(family="qwen3_vl_moe", hidden=256, layers=2, heads=2, kv_heads=2, head_dim=128, mlp=1024,
                            experts=8, experts_per_token=2, expert_mlp=256, mrope=[16, 24, 24], theta=5e6,
                            vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                                        deepstack_visual_indexes=[1])),
    # the larger Qwen3-VL checkpoints (their config.json: Qwen3-VL-8B/32B-Instruct, Qwen3-VL-30B-A3B-Instruct's
    # 128 experts of which 8 per token), one vision tower of 27 blocks with deepstack after 8, 16, 24
    "qwen3-vl-8b": dict(family="qwen3_vl", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288,
                        mrope=[24, 20, 20], theta=5e6, vision=QWEN3_VISION),
    "qwen3-vl-32b": dict(family="qwen3_vl", hidden=5120, layers=64, heads=64, kv_heads=8, head_dim=128, mlp=25600,
                         mrope=[24, 20, 20], theta=5e6, vision=QWEN3_VISION),
    "qwen3-vl-30b-a3b": dict(family="qwen3_vl_moe", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128,
                             mlp=6144, experts=128, experts_per_token=8, expert_mlp=768, mrope=[24, 20, 20], theta=5e6,
                             vision=QWEN3_VISION),
    # Qwen3.5-9B's config.json: 32 layers, three Gated DeltaNet (linear attention: 16 key heads and 32
    # value heads of 128) to one gated full-attention layer (16 heads, 4 KV heads of 256, a quarter
    # of each rotated), Qwen3-VL's tower without deepstack; 248,320 tokens, its own output layer
    "qwen3.5-9b": dict(family="qwen3_5", hidden=4096, layers=32, heads=16, kv_heads=4, head_dim=256, mlp=12288,
                       mrope=[11, 11, 10], theta=1e7, rotary=0.25, vision=QWEN3_5_VISION,
                       linear=dict(key_heads=16, value_heads=32, key_dim=128, value_dim=128, kernel=4)),
    # Qwen3.5 shaped as "clone" (3 linear layers to 1 full, as the real ones)
    "qwen3.5-clone": dict(family="qwen3_5", hidden=256, layers=4, heads=2, kv_heads=2, head_dim=128, mlp=1024,
                          mrope=[11, 11, 10], theta=1e7, rotary=0.5,
                          vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4),
                          linear=dict(key_heads=2, value_heads=4, key_dim=64, value_dim=64, kernel=4)),
    # Gemma 3 (MedGemma 4B and 27B multimodal): its config.json; a SigLIP tower on 896 x 896 images in
    # patches of 14 (64 x 64), pooled to 256 image tokens; 5 sliding-window layers (1024) to 1 full
    "medgemma-4b": dict(family="gemma3", hidden=2560, layers=34, heads=8, kv_heads=4, head_dim=256, mlp=10240,
                        query_scale=256, window=1024, vision=SIGLIP_400M, image_size=896, image_tokens=256),
    "medgemma-27b": dict(family="gemma3", hidden=5376, layers=62, heads=32, kv_heads=16, head_dim=128, mlp=21504,
                         query_scale=168, window=1024, vision=SIGLIP_400M, image_size=896, image_tokens=256),
    # SmolVLM2-2.2B-Instruct's config.json: SmolLM2-1.7B (a Llama: 24 layers, 32 heads of 64, its own
    # output layer) reading SigLIP-so400m tiles of 384 x 384 (patches of 14), pixel-shuffled by 3 to 81
    # tokens a tile; an image of up to 1536 pixels a side is 4 x 4 tiles and itself once more: 1377 tokens
    "smolvlm2-2.2b": dict(family="smolvlm", hidden=2048, layers=24, heads=32, kv_heads=32, head_dim=64, mlp=8192,
                          theta=273768.0, vision=SIGLIP_400M, image_size=384, patch=14, scale=3, image_tokens=17 * 81),
    # SmolVLM2 shaped as "clone", each image one tile of 96 x 96 (patches of 16, shuffled by 2: 9 tokens)
    "smolvlm-clone": dict(family="smolvlm", hidden=256, layers=2, heads=2, kv_heads=2, head_dim=128, mlp=1024,
                          theta=1e5, vision=dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                                 num_attention_heads=4),
                          image_size=96, patch=16, scale=2, image_tokens=9),
    # Gemma 3 shaped as "clone": 224 x 224 images in patches of 14 pooled to 16 tokens, window 64
    "gemma3-clone": dict(family="gemma3", hidden=256, layers=2, heads=2, kv_heads=2, head_dim=128, mlp=1024,
                         query_scale=128, window=64, image_size=224, image_tokens=16,
                         vision=dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                     num_attention_heads=4)),
}
TIED = {"proxy": True, "clone": True, "3b": True, "7b": False, "32b": False, "qwen3-vl-4b": True, "qwen3-clone": True,
        "qwen3-moe-clone": True, "qwen3-vl-8b": False, "qwen3-vl-32b": False, "qwen3-vl-30b-a3b": False,
        "medgemma-4b": True, "medgemma-27b": True, "gemma3-clone": True, "qwen3.5-9b": False, "qwen3.5-clone": True,
        "smolvlm2-2.2b": False, "smolvlm-clone": False}  # 3B ties its output layer to the input
        # embeddings, 7B does not
IMAGE_TOKENS = 256  # merged tokens per image for proxy / 3b: a 16 x 16 grid of 28-pixel cells
# B prompts x G completions, new tokens, and sequences per forward/backward (one group: the
# straightforward path's (8, T, 151,936) float32 logits alone are 0.6 GiB for 128 tokens)
SETTINGS = {"tiny": dict(B=4, G=8, new=24, micro=0), "proxy": dict(B=4, G=8, new=128, micro=8),
            "clone": dict(B=4, G=8, new=128, micro=8, image_tokens=12),  # the synthetic images at Qwen's smallest size
            "3b": dict(B=4, G=8, new=256, micro=8), "7b": dict(B=4, G=8, new=256, micro=8),
            "32b": dict(B=4, G=8, new=256, micro=8), "qwen3-vl-4b": dict(B=4, G=8, new=256, micro=8),
            "qwen3-clone": dict(B=4, G=8, new=128, micro=8, image_tokens=12),
            "qwen3-moe-clone": dict(B=4, G=8, new=128, micro=8, image_tokens=12),
            "gemma3-clone": dict(B=4, G=8, new=128, micro=8, image_tokens=16),
            "qwen3.5-clone": dict(B=4, G=8, new=128, micro=8, image_tokens=12),
            "smolvlm-clone": dict(B=4, G=8, new=128, micro=8, image_tokens=9),
            **{name: dict(B=4, G=8, new=256, micro=8) for name in ("qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b",
                                                                   "medgemma-4b", "medgemma-27b", "qwen3.5-9b",
                                                                   "smolvlm2-2.2b")}}
PROMPT_TEXT_TOKENS = 64  # a real tokenizer's chat template, r1 instructions and query, around the image tokens


# Gemma 3's special tokens and chat format: <bos> from the template, the assistant's turn called
# "model", an image as <start_of_image> (the processor expands it into its block of soft tokens)
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *GEMMA_VISION]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gemma_tokenizer(vocab_size=None):
    """A character tokenizer with Gemma 3's special tokens, named as its processor needs them, that
    puts <bos> before every text as Gemma's does."""
    tok = char_tokenizer(GEMMA_SPECIAL, vocab_size, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def byte_tokenizer(vocab_size=None):
    """Qwen3.5's own tokenizer class (byte-level BPE) with no merges: one token per byte, the Qwen
    special tokens and chat format, the answer template's words whole, and unused tokens up to
    `vocab_size`. Qwen3.5's tokenizer class rebuilds its pipeline from the vocabulary when it
    loads, so a character-level tokenizer would not come back from a save as it went in; this one does."""
    words = sorted(ByteLevel.alphabet()) + [f"<|unused_{i}|>" for i in range(max((vocab_size or 0) - 256 - len(
        SPECIAL_TOKENS) - len(TEMPLATE_TOKENS), 0))]
    tok = Qwen3_5Tokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.add_tokens(TEMPLATE_TOKENS)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


SMOLVLM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", *SMOLVLM_VISION]


def smolvlm_tokenizer(vocab_size=None):
    """A character tokenizer with SmolVLM2's special tokens (its image block's, named as its
    processor looks them up) and its chat format."""
    tok = char_tokenizer(SMOLVLM_SPECIAL, vocab_size, eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
                         extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                                               "global_image_token": "<global-img>",
                                               "end_of_utterance_token": "<end_of_utterance>"})
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    return tok


def shape_tokenizer(name):
    """The tokenizer a SHAPES entry is built around, with its family's real vocabulary size."""
    family = SHAPES.get(name, {}).get("family")
    if family == "gemma3":
        return gemma_tokenizer(GEMMA_VOCAB)
    if family == "qwen3_5":
        return byte_tokenizer(QWEN3_5_VOCAB)
    if family == "smolvlm":
        return smolvlm_tokenizer(SMOLVLM_VOCAB)
    return build_tiny_tokenizer(vocab_size=151_936)


def gemma_config(s, tok, tied):
    """A Gemma3Config of a SHAPES entry: every sixth layer full attention, the rest sliding."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL}
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(s["layers"] - 1)]
    text = dict(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                head_dim=s["head_dim"], query_pre_attn_scalar=s["query_scale"], sliding_window=s["window"],
                layer_types=kinds + ["full_attention"], pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], tie_word_embeddings=tied)
    return Gemma3Config(text_config=text, vision_config=dict(**s["vision"], image_size=s["image_size"], patch_size=14),
                        mm_tokens_per_image=s["image_tokens"], boi_token_index=ids["<start_of_image>"],
                        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
                        tie_word_embeddings=tied)


def smolvlm_config(s, tok, tied):
    """A SmolVLMConfig of a SHAPES entry: a Llama over pixel-shuffled SigLIP tiles."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<end_of_utterance>", "<|endoftext|>")}
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                head_dim=s["head_dim"], rope_theta=s["theta"], eos_token_id=ids["<end_of_utterance>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=tied)
    return SmolVLMConfig(text_config=text, vision_config=dict(**s["vision"], image_size=s["image_size"],
                                                              patch_size=s["patch"]),
                         scale_factor=s["scale"], image_token_id=ids["<image>"], pad_token_id=ids["<|endoftext|>"],
                         tie_word_embeddings=tied)


def qwen3_5_config(s, ids, vocab, tied):
    """A Qwen3_5Config of a SHAPES entry: three linear-attention layers to one full-attention layer."""
    kinds = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(s["layers"])]
    linear = s["linear"]
    text = dict(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                layer_types=kinds, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                head_dim=s["head_dim"], linear_num_key_heads=linear["key_heads"],
                linear_num_value_heads=linear["value_heads"], linear_key_head_dim=linear["key_dim"],
                linear_value_head_dim=linear["value_dim"], linear_conv_kernel_dim=linear["kernel"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": s["theta"], "partial_rotary_factor": s["rotary"],
                                 "mrope_section": s["mrope"], "mrope_interleaved": True})
    return Qwen3_5Config(text_config=text, vision_config=dict(**s["vision"], out_hidden_size=s["hidden"], patch_size=16,
                                                              spatial_merge_size=2, temporal_patch_size=2),
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                         tie_word_embeddings=tied)


def shape_config(name, tok):
    """The config of a SHAPES entry (a Qwen2.5-VL unless it names its family) around the tokenizer
    `tok` (shape_tokenizer)."""
    s = SHAPES[name]
    if s.get("family") == "gemma3":
        return gemma_config(s, tok, TIED[name])
    if s.get("family") == "smolvlm":
        return smolvlm_config(s, tok, TIED[name])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    if s.get("family") == "qwen3_5":
        return qwen3_5_config(s, ids, len(tok), TIED[name])
    if s.get("family", "").startswith("qwen3_vl"):
        moe = dict(num_experts=s["experts"], num_experts_per_tok=s["experts_per_token"],
                   moe_intermediate_size=s["expert_mlp"], decoder_sparse_step=1) if "experts" in s else {}
        return (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
            text_config=dict(**moe, vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                             num_hidden_layers=s["layers"], num_attention_heads=s["heads"], head_dim=s["head_dim"],
                             num_key_value_heads=s["kv_heads"], eos_token_id=ids["<|im_end|>"],
                             pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=TIED[name],
                             rope_parameters={"rope_type": "default", "rope_theta": s["theta"],
                                              "mrope_section": s["mrope"], "mrope_interleaved": True}),
            vision_config=dict(**s["vision"], out_hidden_size=s["hidden"], patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=TIED[name])
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=s.get("vocab", len(tok)), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=TIED[name],
                         rope_scaling={"type": "mrope", "rope_type": "default", "rope_theta": s["theta"],
                                       "mrope_section": s["mrope"]}),
        vision_config=dict(**s["vision"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=TIED[name])


def build(name, device, precision, image_tokens=IMAGE_TOKENS, meta=False):
    """The benchmark policy: the built-in tiny model, or a random-init Qwen2.5-VL of a SHAPES entry
    whose processor resizes every image to `image_tokens` merged tokens. `meta`: built on the meta
    device and materialised on `device` in the run's dtype (a 3B never passes through CPU memory
    in float32, nor through torch's slow default initialisation)."""
    if name == "tiny":
        return load_vlm("tiny", device, precision, gradient_checkpointing=device == "cuda")
    tok = shape_tokenizer(name)
    torch.manual_seed(0)
    dtype, amp = train_precision(device, precision)
    config = shape_config(name, tok)
    if meta:
        with weights_on_meta():
            model = FAMILIES[config.model_type].model(config)
        model = materialised(model, device, dtype)
    else:
        model = FAMILIES[config.model_type].model(config).to(device=device, dtype=dtype)
    if device == "cuda":
        checkpoint_activations(model)
    return VLM(model, shape_processor(config, tok, image_tokens), template="r1", amp_dtype=amp)


def shape_processor(config, tok, image_tokens):
    """The family's real processor around `tok`, resizing every image to `image_tokens` merged tokens
    (Gemma 3: to its one image size, whose tokens its config sets)."""
    if config.model_type == "smolvlm":  # each image one tile (no splitting): its config sets its tokens
        side, per_tile = config.vision_config.image_size, tile_tokens(config)
        images = SmolVLMImageProcessor(do_image_splitting=False, max_image_size={"longest_edge": side},
                                       size={"longest_edge": side})
        return SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                                image_seq_len=per_tile, chat_template=SMOLVLM_CHAT_TEMPLATE)
    if config.model_type == "gemma3":
        side = config.vision_config.image_size
        return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tok, chat_template=GEMMA_CHAT_TEMPLATE,
                               image_seq_length=config.mm_tokens_per_image)
    cell = 2 * config.vision_config.patch_size  # a merged 2 x 2 block of patches
    pixels = image_tokens * cell * cell
    if not config.model_type.startswith("qwen3"):
        return build_tiny_processor(tok, pixels, pixels)
    images = Qwen2VLImageProcessor(patch_size=config.vision_config.patch_size, merge_size=2, min_pixels=pixels,
                                   max_pixels=pixels)
    return Qwen3VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=TINY_CHAT_TEMPLATE)


def materialised(model, device, dtype, std=0.02):
    """A model whose parameters are on the meta device, given random weights on `device` in `dtype`
    one tensor at a time: norms' scales 1, biases 0, the rest normal(0, std); tied tensors (the
    output layer and the input embeddings) stay one tensor. Buffers (rotary frequencies) move as they are."""
    aliases = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(key)
    for p, keys in aliases.values():
        value = torch.empty(p.shape, device=device, dtype=dtype)
        if keys[0].endswith("bias"):
            value.zero_()
        elif "norm" in keys[0] and p.dim() == 1:
            value.fill_(1.0)
        else:
            value.normal_(0.0, std)
        new = torch.nn.Parameter(value, requires_grad=p.requires_grad)
        for key in keys:
            module, _, leaf = key.rpartition(".")
            model.get_submodule(module).register_parameter(leaf, new)
    return model.to(device)


def train_precision(device, precision):
    """(weight dtype, autocast dtype) as load_vlm picks them."""
    if precision == "auto":
        precision = "bf16-mixed" if device == "cuda" else "fp32"
    return PRECISIONS[precision]


# ----------------------------------------------------------------------------- the straightforward path
class Naive(VLM):
    """The straightforward path, the reference of the lean one (here and in tests/test_step.py):
    every prompt repeated G times through the whole model when sampling and when scoring."""

    @classmethod
    def of(cls, vlm):
        naive = copy.copy(vlm)  # the same model and processor
        naive.__class__ = cls
        return naive

    def prefill(self, batch, copies, max_new_tokens):
        return super().prefill(VLM.repeat_rows(batch, copies), 1, max_new_tokens)  # G prompt prefills, no cache copies

    def completion_logps(self, batch, completion_ids, temperature=1.0, mask=None, sampling=True):
        """log pi(token) (N, T) from full (N, T, vocab) logits of the prompts repeated G times."""
        N, T = completion_ids.shape
        rows = VLM.repeat_rows(batch, N // batch["input_ids"].shape[0])
        ones = torch.ones_like(completion_ids)
        # the completion tokens are text: token type 0
        types = {k: torch.cat([rows[k], 0 * ones], 1) for k in ("mm_token_type_ids", "token_type_ids") if k in rows}
        with self.context():
            logits = self.model(input_ids=torch.cat([rows["input_ids"], completion_ids], 1),
                                attention_mask=torch.cat([rows["attention_mask"], ones], 1),
                                **{**self.vision_inputs(rows), **types},
                                logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        return self.policy_logprobs(logits, temperature, sampling).gather(-1, completion_ids[..., None])[..., 0]

    def completion_loss(self, batch, completion_ids, objective, temperature=1.0, mask=None, sampling=True):
        """The objective's sum over the scored tokens, backpropagated by autograd through the logits."""
        logp = self.completion_logps(batch, completion_ids, temperature, sampling=sampling)
        mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        return objective(logp[mask], 0, int(mask.sum())).sum(), logp.detach() * mask


# ----------------------------------------------------------------------------- one step timed by phase
class WorkCounter:
    """Forward hooks that count the vision encoder's images and the prompt tokens the language model
    processes (prompt columns of each call: a call shorter than the prompt is a decode step)."""

    def __init__(self, *vlms):
        self.images = self.prompt_tokens = 0
        self.prompt_len = 0
        for vlm in vlms:
            getattr(vlm.model.model, vlm.family.vision[0]).register_forward_pre_hook(self.vision, with_kwargs=True)
            vlm.language_model.register_forward_pre_hook(self.language, with_kwargs=True)

    def vision(self, module, args, kwargs):
        if "pixel_values" in kwargs:  # a "fixed" family: one (3, H, W) image per row
            self.images += kwargs["pixel_values"].shape[0]
            return
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.images += grid_thw.shape[0]  # one (t, h, w) row per image

    def language(self, module, args, kwargs):
        tokens = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        rows, cols = tokens.shape[:2]
        self.prompt_tokens += rows * min(cols, self.prompt_len) if cols >= self.prompt_len else 0

    def reset(self, prompt_len):
        self.images = self.prompt_tokens = 0
        self.prompt_len = prompt_len


def step_once(run, samples, counter):
    """One GRPO step; returns seconds per phase, completion tokens and the counters, and the step's record."""
    cfg = run.cfg
    prompt_len = run.policy.encode([samples[0].image()], [run.task.prompt(samples[0])])["input_ids"].shape[1]
    counter.reset(prompt_len)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    phases = {}
    logs = train.grpo_step(run, samples, samples, 1, phases)  # the samples are the whole set: no extra rounds
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    return {**{p: phases.get(p, 0.0) for p in PHASES}, "total": sum(phases.values()),
            "completions": cfg.batch_prompts * cfg.group_size, "tokens": logs["completion_tokens"],
            "images": counter.images, "prompt_tokens": counter.prompt_tokens, "peak_gib": peak}, logs


def tracker_seconds(run, samples, tracker, step, logs):
    """What train.py's tracker_step costs: the step's record logged (every step), and apart, two
    completions of each of two samples drawn and logged (every --log-samples-every steps)."""
    t0 = time.perf_counter()
    tracker.log({"step": step, **logs})
    t1 = time.perf_counter()
    tracker.log_samples(step, train.sampled_completions(run, samples[:2]))
    return {"tracker_log": t1 - t0, "tracker_samples": time.perf_counter() - t1}


def step_runs(model, device, precision, B, G, new, image_tokens, paths=(), lora_rank=0, meta=False):
    """The policy built for timing and the runs of one step each path takes: lean, and among
    `paths` naive (Naive) and compiled (the same model, its decoding step compiled). With
    `lora_rank`, adapters on the attention and MLP layers, the reference their off switch."""
    policy = build(model, device, precision, image_tokens, meta)
    # completions run to max_new_tokens: a suppressed token never gets sampled, so nothing stops
    policy.eos_ids = policy.suppress_ids[:1].tolist()
    if lora_rank:
        lora.inject(policy.model, lora_rank, 2 * lora_rank)
        policy.model.to(device)
    ref = policy.frozen_copy()
    counter = WorkCounter(policy, ref)
    cfg = Config(batch_prompts=B, group_size=G, max_new_tokens=new, micro_batch=SETTINGS[model]["micro"], lr=1e-6,
                 lora_rank=lora_rank)
    optimizer, params = start.optimizer_of(cfg, policy)
    task, tau = Grounding(policy.template, policy.coord), make_schedule("fixed", tau=0.5)
    runs = {"lean": start.Run(cfg, task, policy, ref, optimizer, params, tau)}
    if "naive" in paths:
        runs["naive"] = start.Run(cfg, task, Naive.of(policy), Naive.of(ref), optimizer, params, tau)
    if "compiled" in paths:
        compiled = copy.copy(policy)
        compiled.compile_decoding()
        runs["compiled"] = start.Run(cfg, task, compiled, ref, optimizer, params, tau)
    return policy, task, runs, counter


def time_runs(runs, counter, B, steps, warmup, tracker=None):
    """Every path's step on the same prompts, interleaved (outside load hits all paths alike):
    {path: [step_once's numbers of each timed step]}, each path's first rollout (its compilation
    included), and the last step's prompts."""
    data = load_dataset("synth:mix")
    results, first = {v: [] for v in runs}, {}
    for i in range(warmup + steps):
        samples = [data[(i * B + k) % len(data)] for k in range(B)]
        for v, run in runs.items():
            r, logs = step_once(run, samples, counter)
            if tracker and v == "lean":
                r.update(tracker_seconds(run, samples, tracker, i + 1, logs))
            first.setdefault(v, r["rollout"])
            if i >= warmup:
                results[v].append(r)
    return results, first, samples


def phase_utilisation(policy, samples, task, results, B, G, new, rate):
    """The step's FLOPs per phase (step_flops, images of the last step's size) over their median
    seconds in `results`, and the share of `rate` (the device's square-matmul FLOP/s) that makes:
    {phase or "step": {"gflop", "gflop_per_s", "utilisation"}}."""
    batch = policy.encode([samples[0].image()], [task.prompt(samples[0])])
    image_tokens = (int(batch["image_grid_thw"][0].prod()) // 4 if "image_grid_thw" in batch  # Qwen: its grid
                    else int((batch["input_ids"][0] == policy.model.config.image_token_id).sum()))  # the image's tokens
    flops = step_flops(policy.model.config, B, G, new, batch["input_ids"].shape[1], image_tokens)
    out = {}
    for phase in list(flops) + ["step"]:
        work = sum(flops.values()) if phase == "step" else flops[phase]
        seconds = statistics.median(r["total" if phase == "step" else phase] for r in results)
        out[phase] = {"gflop": work / 1e9, "gflop_per_s": work / seconds / 1e9, "utilisation": work / seconds / rate}
    return out


# ----------------------------------------------------------------------------- FLOPs and utilisation
def tower(config, image_tokens):
    """The vision encoder as the plan and the FLOPs count it, for each kind: Qwen's (any image
    size; 2 x 2 patches merged into one image token, `image_tokens` of them), Gemma 3's SigLIP
    (one image size; its patches pooled to the config's tokens per image) or SmolVLM's (tiles of
    one size, each pixel-shuffled into tile_tokens; `image_tokens` / tile_tokens of them). depth, hidden, heads,
    mlp: its blocks; patches: per image; pixels: numbers per patch; merged: the width the merger
    or projector reads per image token; window: the patches a windowed block attends over; full:
    the blocks in full attention; values: the numbers of pixel_values per image."""
    v = config.vision_config
    if config.model_type == "smolvlm":  # tiles of one size, each encoded alone, then shuffled into tile_tokens
        side, tiles = v.image_size // v.patch_size, max(1, round(image_tokens / tile_tokens(config)))
        return types.SimpleNamespace(depth=v.num_hidden_layers, hidden=v.hidden_size, heads=v.num_attention_heads,
                                     mlp=v.intermediate_size, patches=tiles * side * side, pixels=3 * v.patch_size ** 2,
                                     merged=v.hidden_size * config.scale_factor ** 2, window=side * side, full=0,
                                     values=tiles * 3 * v.image_size ** 2)  # a tile's edge beyond whole patches too
    if config.model_type == "gemma3":
        side = v.image_size // v.patch_size
        return types.SimpleNamespace(depth=v.num_hidden_layers, hidden=v.hidden_size, heads=v.num_attention_heads,
                                     mlp=v.intermediate_size, patches=side * side, pixels=3 * v.patch_size ** 2,
                                     merged=v.hidden_size, window=side * side, full=v.num_hidden_layers,
                                     values=side * side * 3 * v.patch_size ** 2)
    patches = 4 * image_tokens
    # Qwen2.5-VL windows most blocks; Qwen3-VL attends over the whole image in every block
    window = min(patches, (v.window_size // v.patch_size) ** 2) if hasattr(v, "window_size") else patches
    return types.SimpleNamespace(depth=v.depth, hidden=v.hidden_size, heads=v.num_heads, mlp=v.intermediate_size,
                                 patches=patches, pixels=pixels_per_patch(v), merged=v.hidden_size * 4,
                                 window=window, full=len(getattr(v, "fullatt_block_indexes", range(v.depth))),
                                 values=patches * pixels_per_patch(v))


def tile_tokens(config):
    """SmolVLM's image tokens per tile: its patches, pixel-shuffled by scale_factor on each side."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // config.scale_factor ** 2


def linear_flops(config, image_tokens=IMAGE_TOKENS):
    """Matmul FLOPs per token of one language layer (the mean over its kinds of layer), per patch
    of one vision block, per merged image token of the merger (Qwen's 2-layer MLP, Gemma's one
    projection), per patch of the patch embedding, per position of the output layer (2 x
    multiply-adds; biases, norms and activations are left out: a fraction of a percent)."""
    text, vision = config.text_config, tower(config, image_tokens)
    h = text.hidden_size
    hv, mv, merged = vision.hidden, vision.mlp, vision.merged
    out = getattr(config.vision_config, "out_hidden_size", h)  # Gemma's projector maps to the text width
    one_layer = config.model_type in ("gemma3", "smolvlm")  # a single projection (Qwen's merger: two layers)
    merger = merged * h if one_layer else merged * merged + merged * out
    layers = layer_flops(text)
    return {"layer": sum(layers) / len(layers),
            "block": 2 * (hv * 3 * hv + hv * hv + (2 if one_layer else 3) * hv * mv),
            "merger": 2 * merger, "patch": 2 * vision.pixels * hv, "head": 2 * h * text.vocab_size}


def layer_flops(text):
    """Matmul FLOPs per token of each language layer: attention's q, k, v, o (Qwen3.5's q twice as
    wide, its output gate) or a linear-attention layer's qkv, z, b, a and output projections (the
    delta rule's own products, a few per head and token, left out), then the MLP."""
    h, m = text.hidden_size, text.intermediate_size
    q, kv = text.num_attention_heads * head_dim(text), text.num_key_value_heads * head_dim(text)
    gate = 2 if getattr(text, "attn_output_gate", False) or text.model_type == "qwen3_5_text" else 1
    attention = h * q * gate + 2 * h * kv + q * h
    if "linear_attention" in layer_kinds(text):
        k = text.linear_num_key_heads * text.linear_key_head_dim
        v = text.linear_num_value_heads * text.linear_value_head_dim
        linear = h * (2 * k + v) + h * v + 2 * h * text.linear_num_value_heads + v * h
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [2 * ((linear if kind == "linear_attention" else attention) + 3 * h * m) for kind in kinds]


def attention_layers(text):
    """The language layers that attend over the sequence (a linear-attention layer carries a state instead)."""
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return sum(kind != "linear_attention" for kind in kinds)


def head_dim(text):
    """The attention heads' width: a config's head_dim (Qwen3-VL-4B: 128, not 2560 / 32), else hidden / heads."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def pixels_per_patch(vision):
    """Numbers of one patch row of pixel_values: channels x temporal patch x patch x patch (14 or 16)."""
    return 3 * vision.temporal_patch_size * vision.patch_size ** 2


def attention_flops(config, queries, keys):
    """QK^T and PV of every language layer for `queries` positions each seeing `keys` (sdpa
    computes a masked square whole)."""
    text = config.text_config
    return 4 * queries * keys * text.hidden_size * attention_layers(text)


def vision_flops(config, images, image_tokens, attention=True):
    """The vision encoder on `images` images of `image_tokens` merged tokens: patch embedding,
    blocks, merger; windowed attention except in the full-attention blocks."""
    vision, f = tower(config, image_tokens), linear_flops(config, image_tokens)
    patches = vision.patches
    total = images * (patches * (f["patch"] + vision.depth * f["block"]) + image_tokens * f["merger"])
    if attention:
        windowed = vision.depth - vision.full
        total += images * 4 * patches * vision.hidden * (vision.full * patches + windowed * vision.window)
    return total


def step_flops(config, B, G, T, prompt_tokens, image_tokens, attention=True):
    """FLOPs per phase of one lean GRPO step (this process's B prompts, G completions of T tokens
    each, run to full length; METHOD.md 5.1 and 5.5): the rollout prefills each prompt once and
    decodes T - 1 steps over B*G rows, each reading the cache (the useful part of it); scoring runs
    one row per group, [prompt | G completions of T-1 tokens] (a recurrent family: one row per
    completion, [prompt | completion], its image encoded in each), and the output layer on the N*T
    positions. The policy forward also takes the output layer's gradients (dX and dW: twice its
    forward, model.OutputLayer); the backward costs twice the forward's other matmuls and 2.5x its
    attention (flash backward: five matmuls)."""
    f, layers = linear_flops(config, image_tokens), config.text_config.num_hidden_layers
    N, L = B * G, prompt_tokens
    rows, S = (N, L + T - 1) if FAMILIES[config.model_type].recurrent else (B, L + G * (T - 1))
    vision = vision_flops(config, B, image_tokens, attention)
    prefill = vision + B * L * layers * f["layer"] + B * f["head"]
    decode = (T - 1) * N * (layers * f["layer"] + f["head"])  # the prefill's logits give the first token
    score_linear = vision_flops(config, rows, image_tokens, False) + rows * S * layers * f["layer"] + N * T * f["head"]
    score_attention = rows * attention_flops(config, S, S) if attention else 0
    vision_attention = (vision_flops(config, rows, image_tokens, attention)
                        - vision_flops(config, rows, image_tokens, False))
    if attention:
        prefill += B * attention_flops(config, L, L)
        decode += N * sum(attention_flops(config, 1, L + t) for t in range(1, T))
    forward = score_linear + score_attention
    head = N * T * f["head"]
    return {"rollout": prefill + decode, "reference": forward, "policy_forward": forward + 2 * head,
            "backward": 2 * (score_linear - head) - rows * tower(config, image_tokens).patches * f["patch"]
            + 2.5 * (score_attention + vision_attention)}


def matmul_rate(device, dtype):
    """FLOP/s of this device's square matmuls (the utilisation's denominator): median of 5."""
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:])


# ----------------------------------------------------------------------------- the memory plan
GiB = 2 ** 30
TOKENIZER_BYTES_PER_ENTRY = 360     # the loaded processor, per vocabulary entry (measured: 52 MiB for 151,936)


def plan_model(name, lora_rank=0):
    """The model of a memory plan on the meta device (shapes, no memory): tiny, proxy, 3b or 7b."""
    with weights_on_meta():
        if name == "tiny":
            model = build_tiny_model(build_tiny_tokenizer())
        else:
            config = shape_config(name, shape_tokenizer(name))
            model = FAMILIES[config.model_type].model(config)
        if lora_rank:
            lora.inject(model, lora_rank, 2 * lora_rank)
    return model


def memory_plan(model, cfg, prompt_tokens, image_tokens, ranks=1, fsdp=False, device="cuda", shard=None):
    """Expected peak bytes per process in each phase of a run, term by term, from the model's
    shapes and the run's settings (docs/usage.md, "Memory"). Steady state (the second step on):
    the weights, the reference and AdamW's moments stay resident, the gradients from the first
    backward to the optimizer step; each phase adds its own working set on top. Terms for the
    step as model.py and train.py run it: the shared-prompt scoring row, the output layer in
    chunks of LOGIT_CHUNK, sdpa attention.
    `prompt_tokens`: of one prompt, its `image_tokens` (merged image tokens) included. `shard`:
    under --fsdp hybrid, the processes a copy is split over (default: all `ranks`)."""
    s = plan_sizes(model, cfg, prompt_tokens, image_tokens, ranks, fsdp, device, shard)
    resident = {"weights": s.local * s.weight_bytes,
                "reference": s.local * s.weight_bytes if cfg.beta > 0 and not cfg.lora_rank else 0,
                "AdamW moments": 2 * s.trainable * s.grad_bytes,
                "prompt pixels": s.B * s.vision.values * 4}
    gradients = {"gradients": s.trainable * s.grad_bytes}
    # torch's fused AdamW (start.optimizer_of) updates each tensor in place: no temporaries to plan for
    setup = {"weights": resident["weights"], "reference": resident["reference"],
             "processor": s.text.vocab_size * TOKENIZER_BYTES_PER_ENTRY}
    return {"set-up": setup, "sampling": {**resident, **sampling_terms(s)},
            "scoring": {**resident, **gradients, **scoring_terms(s, cfg)},
            "update": {**resident, **gradients}}


def plan_sizes(model, cfg, prompt_tokens, image_tokens, ranks, fsdp, device, shard=None):
    """What the plan's terms are made of: bytes per number, this process's parameter counts, the
    step's sizes."""
    weights_dtype, amp = train_precision(device, cfg.precision)
    head = model.lm_head.weight
    params = list({id(p): p for p in model.parameters()}.values())                # tied tensors once
    split = lambda p: p.numel() / (shard or ranks) if fsdp and p is not head else p.numel()  # the head stays whole
    return types.SimpleNamespace(
        text=model.config.text_config, vision=tower(model.config, image_tokens), model=model, head=head,
        params=params, fsdp=fsdp,
        weight_bytes=weights_dtype.itemsize,                 # fp32 masters unless pure bf16
        act=(amp or weights_dtype).itemsize,                 # what activations and the KV cache are computed in
        grad_bytes=4 if cfg.lora_rank else weights_dtype.itemsize,  # LoRA's adapters are float32 on any base
        local=sum(split(p) for p in params), trainable=sum(split(p) for p in params if p.requires_grad),
        B=cfg.batch_prompts // ranks, G=cfg.group_size, T=cfg.max_new_tokens, L=prompt_tokens)


def text_layers(model):
    """The decoder layers of a model's language model, whatever its family calls it."""
    return getattr(model.model, FAMILIES[model.config.model_type].text).layers


def checkpoint_plan(model, cfg, ranks, fsdp, shard=None, device="cuda"):
    """The memory a checkpoint's write adds, per layout: `whole` gathers the weights and AdamW's
    moments to rank 0's CPU memory (one tensor at a time on the devices); `sharded` has each process
    write its own part (CPU: at most that part staged); final/ of a sharded run is streamed one
    unit (a decoder layer) at a time. {layout: {"host": bytes on the busiest process's CPU,
    "device": bytes beyond the step's}}."""
    s = plan_sizes(model, cfg, 1, 1, ranks, fsdp, device, shard)
    whole = sum(p.numel() for p in s.params)
    trainable = sum(p.numel() for p in s.params if p.requires_grad)
    largest = max(p.numel() for p in s.params) * s.weight_bytes
    layer = sum(p.numel() for p in text_layers(model)[0].parameters()) * s.weight_bytes
    return {"whole": {"host": whole * s.weight_bytes + 2 * trainable * s.grad_bytes, "device": largest if fsdp else 0},
            "sharded": {"host": s.local * s.weight_bytes + 2 * s.trainable * s.grad_bytes, "device": 0},
            "final/, streamed": {"host": max(layer, largest), "device": max(layer, largest) if fsdp else 0}}


def sampling_terms(s):
    """The static KV cache of B*G rows (model.VLM.static_cache: the prompt plus T tokens, rounded up
    to CACHE_BLOCK), the prefill's own cache of the B prompts that is copied into it, the next-token
    logits; with --fsdp, every unit's weights gathered in the compute dtype for the whole rollout."""
    text, rows = s.text, s.B * s.G
    # values come out of a matmul in the compute dtype, keys out of the rotary embedding in the
    # hidden states' dtype: the fp32 masters' under autocast, bf16 under FSDP2's mixed precision
    keys = s.act if s.fsdp else s.weight_bytes
    per_position = attention_layers(text) * text.num_key_value_heads * head_dim(text) * (keys + s.act)
    length = -(-(s.L + s.T) // CACHE_BLOCK) * CACHE_BLOCK
    terms = {"KV cache": per_position * rows * length, "prompts' KV cache": per_position * s.B * s.L,
             "next-token logits": 5 * rows * text.vocab_size * 4}
    linear = text.num_hidden_layers - attention_layers(text)
    if linear:  # per row: the recurrent state in float32, the conv state's last `kernel` inputs; the prompts' copied
        k = text.linear_num_key_heads * text.linear_key_head_dim
        v = text.linear_num_value_heads * text.linear_value_head_dim
        state = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
        conv = (2 * k + v) * text.linear_conv_kernel_dim * s.act
        terms["linear-attention states"] = (rows + s.B) * linear * (state + conv)
    if s.fsdp:
        terms["gathered weights"] = sum(p.numel() for p in s.params if p is not s.head) * s.act
    return terms


def scoring_terms(s, cfg):
    """Per forward, `groups` rows of [prompt | G completions] (a recurrent family: a row, and its
    image, per completion; its linear layers counted as attention layers). What autograd keeps per token and
    layer: the two norms' inputs and outputs, q, repeated k and v, the attention output and its
    reshaped copy, rotary cos/sin, the MLP's four m-wide tensors, and the row's S-wide float mask.
    The output layer's chunk (model.OutputLayer): its logits, their copy at temperature T and the
    log-softmax, which becomes the logits' gradient in place; its weight gradient goes in place."""
    text, vision, act = s.text, s.vision, s.act
    h, heads, layers = text.hidden_size, text.num_attention_heads, text.num_hidden_layers
    groups, S = (cfg.micro_batch or s.B * s.G) // s.G, s.L + s.G * (s.T - 1)
    if FAMILIES[s.model.config.model_type].recurrent:  # a row per completion, its image in each (model.row_hidden)
        groups, S = cfg.micro_batch or s.B * s.G, s.L + s.T - 1
    per_token = 6 * h + 2 * head_dim(text) + 5 * heads * head_dim(text) + 4 * text.intermediate_size + S
    per_patch = 11 * vision.hidden + 2 * (vision.hidden // vision.heads) + 4 * vision.mlp + vision.patches
    if cfg.gradient_checkpointing:  # one tensor per layer kept; one layer's activations at a time
        kept = groups * act * (S * (layers * h + per_token)
                               + vision.patches * (vision.depth * vision.hidden + per_patch))
    else:
        kept = groups * act * (S * layers * per_token + vision.patches * vision.depth * per_patch)
    V = text.vocab_size
    chunk = min(max(1, LOGIT_CHUNK // V), groups * s.G * s.T) * V * 4  # float32 log-probs of one chunk
    terms = {"activations": kept, "one layer's backward": groups * S * per_token * act, "log-prob chunk": 3 * chunk}
    if act < s.weight_bytes:  # autocast keeps a bf16 copy of each trainable weight it uses (FSDP's units
        # gather theirs in bf16 already: only the whole output layer is cast)
        cast = s.head.numel() if s.fsdp else sum(p.numel() for p in s.params if p.requires_grad)
        terms["autocast weight copies"] = cast * act if s.head.requires_grad or not s.fsdp else 0
    if s.fsdp:  # a unit being used and the next one prefetched, in the compute dtype
        unit = max(sum(p.numel() for p in layer.parameters()) for layer in text_layers(s.model))
        terms["gathered units"] = 2 * unit * act
    return terms


def step_plan(model, device, precision, B, G, new, image_tokens, lora_rank=0):
    """The memory plan of the step bench.py times (step_runs): gradient checkpointing on CUDA."""
    cfg = Config(batch_prompts=B, group_size=G, max_new_tokens=new, micro_batch=SETTINGS[model]["micro"],
                 lora_rank=lora_rank, precision=precision, gradient_checkpointing=device == "cuda")
    tokens = 16 if model == "tiny" else image_tokens  # the tiny processor's 112 x 112 images
    return memory_plan(plan_model(model, lora_rank), cfg, tokens + PROMPT_TEXT_TOKENS, tokens, device=device)


def free_bytes(device):
    """What `device` has free now: CUDA's free memory, or the kernel's MemAvailable for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return proc_bytes("/proc/meminfo", "MemAvailable")


def cannot_fit(model, plan, device):
    """None if the plan's peak fits what `device` has free, else one line saying what does not."""
    phase, peak = max(((ph, sum(terms.values())) for ph, terms in plan.items()), key=lambda kv: kv[1])
    free = free_bytes(device)
    if peak <= free:
        return None
    return (f"{model} cannot fit on {device}: the memory plan's peak is {peak / GiB:.1f} GiB ({phase}), "
            f"{free / GiB:.1f} GiB is free")


# ----------------------------------------------------------------------------- memory readers
def resident(field):
    """This process's resident memory in bytes: VmRSS now, VmHWM its peak since the last reset."""
    return proc_bytes("/proc/self/status", field)


def proc_bytes(path, field):
    """A 'Field:  N kB' line of a Linux /proc file, in bytes."""
    with open(path) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM starts again from VmRSS


MEASURED_PHASES = {"rollout": "sampling", "reference": "scoring", "policy_forward": "scoring",
                   "backward": "scoring", "optimizer": "update"}


@contextlib.contextmanager
def phase_peaks(peaks, reset, peak):
    """Inside the block, each phase that the step times (`timed` in train.py and sampling.py) starts
    with reset() and leaves peak() in peaks[its memory plan phase] (the largest over its calls): a
    measurement hook around the step, which itself stays as it is."""
    timed = train.timed

    @contextlib.contextmanager
    def watched(phases, name):
        reset()
        with timed(phases, name):
            yield
        if name in MEASURED_PHASES:
            phase = MEASURED_PHASES[name]
            peaks[phase] = max(peaks.get(phase, 0), peak())
    train.timed = sampling.timed = watched
    try:
        yield peaks
    finally:
        train.timed = sampling.timed = timed
