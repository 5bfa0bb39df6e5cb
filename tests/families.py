"""Random-init tiny models of each supported family, saved like hub checkpoints: the real
transformers classes and processor classes, around a character tokenizer with the family's special
tokens and chat format (the real vocabulary size with `vocab_size`). No downloads."""
import torch
from safetensors.torch import load_file, save_file
from transformers import (Gemma3ForConditionalGeneration, Qwen2VLImageProcessor, Qwen3_5Config,
                          Qwen3_5ForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, SmolVLMConfig,
                          SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor)
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from measure import byte_tokenizer, gemma_config, gemma_tokenizer, shape_processor, smolvlm_tokenizer
from model import TINY_CHAT_TEMPLATE, build_tiny_tokenizer

QWEN_IDS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")


def qwen3_vl_folder(path, moe=False, vocab_size=None, seed=0):
    """Qwen3-VL (or its MoE, 4 experts of which 2 per token): 2 layers, interleaved M-RoPE over
    head_dim 32, a vision tower of patch 16 with a deepstack merger after its first block."""
    tok = build_tiny_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS}
    text = dict(vocab_size=vocab_size or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=None,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0], num_position_embeddings=64)
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else
                             (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=32 * 32 * 24)
    Qwen3VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                     chat_template=TINY_CHAT_TEMPLATE).save_pretrained(path)
    return str(path)


def qwen3_5_folder(path, vocab_size=None, seed=0):
    """Qwen3.5: 3 text layers, Gated DeltaNet (linear attention), full attention (gated, with
    partial interleaved M-RoPE), Gated DeltaNet; Qwen3-VL's processor (patch 16) and Qwen3.5's
    byte-level tokenizer class. Its weight file also holds a multi-token-prediction weight, as the
    published ones do, which the model has no place for."""
    tok = byte_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                layer_types=["linear_attention", "full_attention", "linear_attention"], num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, linear_num_value_heads=2, linear_num_key_heads=1,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64)
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(path)
    weights = load_file(f"{path}/model.safetensors")
    save_file({**weights, "mtp.fc.weight": torch.randn(64, 128)}, f"{path}/model.safetensors", metadata={"format": "pt"})
    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=32 * 32 * 24)
    Qwen3VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                     chat_template=TINY_CHAT_TEMPLATE).save_pretrained(path)
    return str(path)


def gemma3_folder(path, vocab_size=None, seed=0):
    """Gemma 3 (MedGemma's class) as measure.gemma_config builds it: 3 text layers, sliding (window
    6), sliding, full, so that long prompts and completions cross the window; a SigLIP tower on
    56 x 56 images (4 x 4 patches of 14) pooled to 4 image tokens; a tokenizer that puts <bos>
    first, as Gemma's does, and Gemma's chat format."""
    tok = gemma_tokenizer(vocab_size)
    shape = dict(hidden=64, layers=3, heads=2, kv_heads=1, head_dim=32, mlp=128, query_scale=32, window=6,
                 image_size=56, image_tokens=4, vision=dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                            num_attention_heads=2))
    config = gemma_config(shape, tok, tied=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # built from a config, the image projection is 0: images would change nothing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(path)
    shape_processor(config, tok, shape["image_tokens"]).save_pretrained(path)
    return str(path)


def smolvlm_folder(path, vocab_size=None, seed=0):
    """SmolVLM2: a 2-layer Llama (SmolLM2's class) reading a SigLIP-style tower's tiles of 32 x 32
    (patches of 8, pixel-shuffled by 2 to 4 tokens a tile); images of up to 64 pixels a side cut
    into up to 2 x 2 tiles, plus the whole image as one more tile."""
    tok = smolvlm_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<end_of_utterance>", "<|endoftext|>")}
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, eos_token_id=ids["<end_of_utterance>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=False)
    vision = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2)
    config = SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
                           pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.save_pretrained(path)
    images = SmolVLMImageProcessor(do_image_splitting=True, max_image_size={"longest_edge": 32},
                                   size={"longest_edge": 64})
    SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                     chat_template=tok.chat_template).save_pretrained(path)
    return str(path)
