"""LoRA by hand: low-rank adapters on chosen linear layers, saved in PEFT's layout (METHOD.md 5.6).

A wrapped layer computes  y = W x + (alpha / r) * B (A dropout(x)),  A (r x in) random, B (out x r)
zero, so a fresh adapter leaves the model unchanged. Only A and B train; W stays frozen. With the
adapters switched off (`disabled`) the model is exactly the starting policy, which is what GRPO's
KL reference needs: no second copy of the model in memory.

Files: `save(model, folder)` writes adapter_config.json + adapter_model.safetensors with PEFT's key
names (base_model.model.<module>.lora_A.weight), which the PEFT library and serving engines read;
`merge(model)` folds the adapters into plain nn.Linear layers for an ordinary save_pretrained folder.
"""
import contextlib
import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The language model's attention and MLP projections (Qwen2 names), and in a linear-attention layer
# (Qwen3.5's Gated DeltaNet) its query-key-value, gate and output projections (not the per-head
# decay and write-strength inputs a and b, one number per head); SmolVLM calls its language model
# text_model. The vision tower stays frozen.
DEFAULT_TARGETS = (r"model\.(language_model|text_model)\.layers\.\d+\."
                   r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))")


class LoRALinear(nn.Module):
    """nn.Linear + a rank-r update; `enabled` False gives the base layer alone."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        # float32 adapters even on a bf16 base: their small updates (lr ~1e-5) survive rounding
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own default
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        base.requires_grad_(False)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scale
        return y + update.to(y.dtype)

    def merged(self):
        """A plain nn.Linear with W + (alpha / r) B A."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            linear.weight.copy_(self.base.weight.float() + delta)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def targets_of(model, targets):
    """Names of the nn.Linear layers that `targets` fully matches; a ValueError if none, or if
    one is an output layer tied to the input embeddings (an adapter there would change both)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not names:
        raise ValueError(f"--lora-targets {targets!r} matches no linear layer of the model")
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False) or model.config.tie_word_embeddings
    if tied and "lm_head" in names:
        raise ValueError(f"--lora-targets {targets!r} includes lm_head, which this model ties to its input "
                         "embeddings; adapt the attention and MLP layers instead")
    return names


def inject(model, rank, alpha, targets=DEFAULT_TARGETS, dropout=0.0):
    """Freeze the model and wrap every nn.Linear whose name fully matches `targets`; returns the names."""
    names = targets_of(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": names}
    return names


def _parent(model, name):
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled(model):
    """The model without its adapters (the starting policy) inside the block."""
    wrapped = [m for _, m in layers(model)]
    for m in wrapped:
        m.enabled = False
    try:
        yield
    finally:
        for m in wrapped:
            m.enabled = True


def merge(model):
    """Replace every LoRALinear by its merged nn.Linear (in place); the model is plain again."""
    for name, m in layers(model):
        parent, child = _parent(model, name)
        setattr(parent, child, m.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config


def save(model, folder, base_name=None):
    """adapter_config.json + adapter_model.safetensors in PEFT's layout and key names."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, m in layers(model):
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    c = model.lora_config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": c["r"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
              "target_modules": c["target_modules"], "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_config(folder):
    """adapter_config.json of `folder`; a ValueError naming the file and field if it cannot serve."""
    path = os.path.join(folder, "adapter_config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})")
    for field, kind in (("r", int), ("lora_alpha", (int, float)), ("target_modules", (list, str))):
        if not isinstance(c.get(field) if isinstance(c, dict) else None, kind) or isinstance(c[field], bool):
            raise ValueError(f"{path}: field {field!r} missing or of the wrong type")
    if not 0 < c["r"] <= 4096 or not math.isfinite(c["lora_alpha"]) or c["lora_alpha"] <= 0:
        raise ValueError(f"{path}: field 'r' must be in 1..4096 and 'lora_alpha' > 0, got {c['r']} and {c['lora_alpha']}")
    return c


def base_of(folder):
    """The model an adapter folder was trained on (adapter_config.json's base_model_name_or_path).
    If that path is gone because the run folder moved, the run's own warm start beside the
    adapters (RUN/warmstart/model next to RUN/checkpoint-N/model) is the same model."""
    base = read_config(folder).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{folder}/adapter_config.json: field 'base_model_name_or_path' missing")
    if os.path.abspath(base) == os.path.abspath(folder):
        raise ValueError(f"{folder}/adapter_config.json: field 'base_model_name_or_path' names the adapter folder itself")
    tail = os.path.join("warmstart", "model")
    moved = os.path.normpath(os.path.join(folder, "..", "..", tail))
    if os.path.isabs(base) and not os.path.exists(base) and base.endswith(tail) and os.path.isdir(moved):
        return moved
    return base


def load(model, folder):
    """Inject adapters as described by `folder`'s adapter_config.json and load their weights."""
    c = read_config(folder)
    names = c["target_modules"]
    pattern = "|".join(re.escape(n) for n in names) if isinstance(names, list) else names
    inject(model, c["r"], c["lora_alpha"], pattern, c.get("lora_dropout", 0.0))
    path = os.path.join(folder, "adapter_model.safetensors")
    try:
        tensors = load_file(path)
    except Exception as e:  # missing or damaged file
        raise ValueError(f"{path}: unreadable ({str(e)[:160]})")
    expected = {f"base_model.model.{name}.{part}.weight" for name, _ in layers(model) for part in ("lora_A", "lora_B")}
    if set(tensors) != expected:  # the config and the weights must name the same layers
        odd = sorted(set(tensors) ^ expected)
        raise ValueError(f"{path}: its tensors and adapter_config.json's target_modules disagree ({len(odd)} "
                         f"differ, e.g. {odd[0]!r})")
    with torch.no_grad():
        for name, m in layers(model):
            for part in ("lora_A", "lora_B"):
                key, weight = f"base_model.model.{name}.{part}.weight", getattr(m, part).weight
                if tensors[key].shape != weight.shape:
                    raise ValueError(f"{path}: {key!r} is {tuple(tensors[key].shape)}, rank r = {c['r']} of "
                                     f"adapter_config.json needs {tuple(weight.shape)}")
                if not torch.isfinite(tensors[key]).all():
                    raise ValueError(f"{path}: {key!r} holds non-finite values")
                weight.copy_(tensors[key])
    return c
