"""Tiny random models of the common families (dense and mixture-of-experts), saved as Hugging Face
directories with the `tiny` test tokenizer: what the family matrix in tests/models/test_families.py
and benchmarks/families.py run on. Two layers, hidden 64: seconds each on a CPU."""
from __future__ import annotations

from pathlib import Path

import torch

# family -> (transformers config class, its keyword arguments beyond the shared ones)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def save_family(name: str, directory: Path) -> Path:
    """A seeded random ``name`` model with the tiny tokenizer in ``directory`` (made once)."""
    import transformers

    from fastprocon.models.specs import tiny_tokenizer

    if (directory / "config.json").exists():
        return directory
    tokenizer = tiny_tokenizer()
    class_name, extra = FAMILIES[name]
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, **extra)
    if name != "gpt_neox":
        kwargs["num_key_value_heads"] = 2
    config = getattr(transformers, class_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
