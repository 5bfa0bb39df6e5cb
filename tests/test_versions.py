"""The spellings that differ across the torch / transformers releases a lab's GPU node has (tested:
transformers 5.17 with torch 2.11, and the pinned 5.24 with 2.14.1): each version check does what
both releases need, shown here with stand-ins for the release this machine does not have."""
import types

import torch
from transformers import cache_utils

import model
from model import cache_arg, checkpoint_activations, load_vlm


def test_the_cache_goes_by_the_name_the_model_takes():
    class Before:  # transformers 5.17's language models
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    class After:  # 5.2x
        def forward(self, input_ids=None, cache=None, use_cache=None):
            pass
    assert cache_arg(Before()) == "past_key_values" and cache_arg(After()) == "cache"
    vlm = load_vlm("tiny")
    out = vlm.model.model(**vlm.encode([torch_image()], ["Find it."]), use_cache=True)
    assert isinstance(getattr(out, vlm.cache_arg), cache_utils.Cache)  # the installed release's own name


def torch_image():
    from PIL import Image
    return Image.new("RGB", (112, 112), (90, 120, 150))


def test_activation_checkpointing_under_either_name():
    calls = []
    older = types.SimpleNamespace(gradient_checkpointing_enable=lambda: calls.append("gradient"))
    newer = types.SimpleNamespace(gradient_checkpointing_enable=lambda: calls.append("deprecated alias"),
                                  activation_checkpointing_enable=lambda: calls.append("activation"))
    checkpoint_activations(older)
    checkpoint_activations(newer)
    assert calls == ["gradient", "activation"]


def test_the_static_cache_keeps_bf16_values_where_older_transformers_sizes_them_by_the_keys(monkeypatch):
    """Under bf16 autocast the values come out of a bf16 matmul, the keys (rotary) in float32.
    Transformers 5.17 holds the prompt's values in the keys' dtype and sizes a static layer's
    values by the keys: the cache must still take bf16 values at every decoding step."""
    vlm = load_vlm("tiny", precision="bf16-mixed")

    def sized_by_the_keys(self, key_states, value_states):  # 5.17's StaticLayer.lazy_initialization
        original(self, key_states, value_states.to(key_states.dtype))
    original = cache_utils.StaticLayer.lazy_initialization
    monkeypatch.setattr(cache_utils.StaticLayer, "lazy_initialization", sized_by_the_keys)
    keys = torch.randn(1, 2, 5, 16)
    values = torch.randn(1, 2, 5, 16).to(torch.bfloat16)
    prompt = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=keys, values=values.float())
                                           for _ in vlm.model.config.text_config.layer_types])
    cache = vlm.static_cache(prompt, 3, model.CACHE_BLOCK)
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.float32 and layer.values.dtype == torch.bfloat16
    assert torch.equal(layer.values[:, :, :5], values.repeat_interleave(3, 0))  # exact: they were bf16 numbers
    assert torch.equal(layer.keys[:, :, :5], keys.repeat_interleave(3, 0))
