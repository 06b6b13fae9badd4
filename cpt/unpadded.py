"""An unpadded BERT encoder pass: padding positions cost nothing.

The padded batch (B, T) is flattened to the N real tokens before the embeddings; every linear
layer, LayerNorm and GELU then runs on (N, H) instead of (B, T, H), and attention runs per
sequence through a variable-length kernel given the cumulative sequence lengths. It reuses the
Hugging Face BERT modules and weights as they are (same state dict), so checkpoints and export
do not change. On CUDA the kernel is PyTorch's flash `varlen_attn` (bf16/fp16; it has no
attention-probability dropout, the one difference from the padded path); elsewhere a reference
kernel pads each batch back for attention (with its dropout), which lets the CPU tests check the
whole path.

    hidden, keep = unpadded_encoder(model.bert, input_ids, attention_mask)   # (N, H), (B, T) bool
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from cpt.fast_dropout import attention_with_dropout


def supports_unpadding(model: torch.nn.Module) -> bool:
    """BERT's absolute positions start at 0 for every sequence; RoBERTa-style offsets are not handled."""
    return getattr(model.config, "model_type", None) == "bert" and hasattr(model, "bert")


def reference_varlen_attention(query, key, value, cu_seqlens: torch.Tensor, max_len: int,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """(N, heads, d) attention per sequence, by padding to (B, heads, T, d): for CPU and tests."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    batch, heads, head_dim = len(lengths), query.shape[1], query.shape[2]
    keep = torch.arange(max_len, device=query.device)[None, :] < torch.tensor(lengths, device=query.device)[:, None]

    def pad(tensor):
        out = tensor.new_zeros(batch, max_len, heads, head_dim)
        out[keep] = tensor
        return out.transpose(1, 2)  # (B, heads, T, d)

    mask = keep[:, None, None, :]  # (B, 1, 1, T): keys that exist
    context = attention_with_dropout(pad(query), pad(key), pad(value), mask, dropout_p)
    return context.transpose(1, 2)[keep]  # (N, heads, d)


def flash_varlen_attention(query, key, value, cu_seqlens: torch.Tensor, max_len: int,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """The flash kernel; it has no dropout, so dropout_p is not applied (see the module docstring)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(query, key, value, cu, cu, max_len, max_len)


def pick_attention(device: torch.device):
    return flash_varlen_attention if device.type == "cuda" else reference_varlen_attention


def unpadded_encoder(bert: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     attention=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the real tokens (N, H) and the (B, T) mask that selects them.

    Assumes right padding (cpt's batches): sequence b's tokens are positions 0..len_b-1."""
    attention = attention or pick_attention(input_ids.device)
    keep = attention_mask.bool()  # (B, T)
    lengths = keep.sum(dim=1)  # (B,)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0), (1, 0))  # (B + 1,)
    max_len = int(lengths.max())
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)[keep]  # (N,)
    token_ids = input_ids[keep]  # (N,)
    hidden = bert.embeddings(input_ids=token_ids[None], position_ids=positions[None],
                             token_type_ids=torch.zeros_like(token_ids)[None])[0]  # (N, H)
    for layer in bert.encoder.layer:
        # transformers 5 marks each layer when activation checkpointing is on.
        if bert.training and getattr(layer, "gradient_checkpointing", False):
            hidden = torch.utils.checkpoint.checkpoint(_layer_forward, layer, hidden, cu_seqlens, max_len, attention,
                                                       use_reentrant=False)
        else:
            hidden = _layer_forward(layer, hidden, cu_seqlens, max_len, attention)
    return hidden, keep


def _layer_forward(layer, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, attention) -> torch.Tensor:
    """One BertLayer on (N, H) real tokens."""
    self_attention = layer.attention.self
    heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
    tokens = hidden.shape[0]
    query = self_attention.query(hidden).view(tokens, heads, head_dim)
    key = self_attention.key(hidden).view(tokens, heads, head_dim)
    value = self_attention.value(hidden).view(tokens, heads, head_dim)
    dropout_p = self_attention.dropout.p if self_attention.training else 0.0
    context = attention(query, key, value, cu_seqlens, max_len, dropout_p).reshape(tokens, heads * head_dim)
    attention_output = layer.attention.output(context, hidden)
    return layer.output(layer.intermediate(attention_output), attention_output)
