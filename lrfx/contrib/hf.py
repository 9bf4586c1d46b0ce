"""Small Hugging Face ``transformers`` models built from configs, with example inputs.

Random weights, nothing downloaded: these are for coverage tests and benchmarks of lrfx's capture
and rewrite on the architectures people use (BERT, GPT-2, Llama, ViT, Whisper, T5, ConvNeXt,
CLIP...). Each builder returns ``(model, example_inputs)`` with the model in eval mode and the
inputs as the keyword mapping a tokenizer or image processor would give (text inputs have
padding in their second row, so attention masks matter).

Example:
    >>> model, inputs = tiny("bert")  # doctest: +SKIP
    >>> sorted(inputs)  # doctest: +SKIP
    ['attention_mask', 'input_ids']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TINY", "tiny"]

VOCAB = 100
HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64


def _text(batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, -3:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size: int = 32, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _bert(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=FFN,
                                max_position_embeddings=64, **kw)), _text()


def _roberta(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=FFN, max_position_embeddings=64,
                                      **kw)), _text()


def _distilbert(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                            n_heads=HEADS, hidden_dim=FFN,
                                            max_position_embeddings=64, **kw)), _text()


def _gpt2(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                n_positions=64, bos_token_id=0, eos_token_id=0, **kw)), _text()


def _gpt2_lm(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, **kw)), _text()


def _llama(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=2,
                                  intermediate_size=FFN, max_position_embeddings=64,
                                  **kw)), _text()


def _vit(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=FFN, image_size=32,
                              patch_size=8, **kw)), _pixels()


def _whisper_encoder(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
                           decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                           decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                           decoder_ffn_dim=FFN, num_mel_bins=16, max_source_positions=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, **kw)
    g = torch.Generator().manual_seed(0)
    return WhisperEncoder(config), {"input_features": torch.randn(2, 16, 32, generator=g)}


def _t5_encoder(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN,
                                   num_layers=LAYERS, num_heads=HEADS, **kw)), _text()


def _convnext(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                        num_stages=2, **kw)), _pixels()


def _clip_text(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                        intermediate_size=FFN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                        **kw)), _text()


def _clip_vision(**kw: Any) -> tuple[nn.Module, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=FFN,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            image_size=32, patch_size=8, **kw)), _pixels()


#: The builders by name (architectures of ``bench/coverage.py``).
TINY: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "bert": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "gpt2": _gpt2,
    "gpt2_lm": _gpt2_lm,
    "llama": _llama,
    "vit": _vit,
    "whisper_encoder": _whisper_encoder,
    "t5_encoder": _t5_encoder,
    "convnext": _convnext,
    "clip_text": _clip_text,
    "clip_vision": _clip_vision,
}


def tiny(name: str, *, seed: int = 0, **config: Any) -> tuple[nn.Module, Any]:
    """A small model of architecture ``name`` (random weights, eval mode) and example inputs.

    Args:
        name: One of :data:`TINY`.
        seed: Seed of the weights.
        config: Extra config fields (``attn_implementation="eager"``, say).
    """
    if name not in TINY:
        raise KeyError(f"unknown architecture {name!r}; one of {', '.join(TINY)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, inputs = TINY[name](**config)
    return model.eval(), inputs
