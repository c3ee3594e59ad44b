"""Where a causal LM keeps its decoder layers, and its sizes, through PEFT / compile / FSDP wrappers."""
from __future__ import annotations

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip PEFT, DDP/FSDP1 and torch.compile wrappers down to the transformers model.

    FSDP2 (``fully_shard``) keeps the module itself, so it needs no unwrapping.
    """
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):   # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):                                          # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel"):
            model = model.module
        else:
            return model


class ModelLayoutError(TypeError, ValueError):
    """A model whose layout fastprocon does not know (no decoder layers where it looks): bad input,
    so the command line reports it in one line."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of the model's L decoder layers (Llama/Mistral/Qwen/GPT-2/GPT-NeoX layouts)."""
    base = unwrap_model(model)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        module = base
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    raise ModelLayoutError(f"cannot find the decoder layers of {type(base).__name__}: expected a ModuleList at "
                           "model.layers (Llama-like) or model.decoder.layers, transformer.h, gpt_neox.layers, layers")


def num_layers(model: torch.nn.Module) -> int:
    """L, the number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model: torch.nn.Module) -> int:
    """D, the width of the residual stream (the length of a refusal direction)."""
    config = unwrap_model(model).config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(size, int):
        raise TypeError(f"{type(config).__name__} has no integer hidden_size")
    return size


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Names of the attention's linear projections in the decoder layers (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``; fused ones such as ``qkv_proj``, ``query_key_value``, ``c_attn``), read
    from the first decoder layer's attention module: the LoRA targets of every family."""
    layer = decoder_layers(model)[0]
    attention = [module for name, module in layer.named_children() if "attn" in name or "attention" in name]
    names = sorted({name.removesuffix(".base_layer").rsplit(".", 1)[-1]   # a LoRA-wrapped layer: its base
                    for block in attention for name, module in block.named_modules()
                    if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
                    and "lora_" not in name})
    if not names:
        found = sorted({name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if name})
        raise ValueError(f"no attention projections found in {type(layer).__name__} (its modules: {found}); "
                         "LoRA targets the attention's linear layers")
    return names
