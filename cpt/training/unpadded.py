"""An unpadded BERT encoder pass: padding positions cost nothing.

The padded batch (B, T) is flattened to the N real tokens before the embeddings; every linear
layer, LayerNorm and GELU then runs on (N, H) instead of (B, T, H), and attention runs per
sequence through a variable-length kernel given the cumulative sequence lengths. It reuses the
Hugging Face BERT modules and weights as they are (same state dict), so checkpoints and export
do not change. On CUDA the kernel is PyTorch's flash `varlen_attn` (bf16/fp16 on sm80+ only, see
`flash_varlen_unusable`); elsewhere a reference kernel pads each batch back for attention, which
lets the CPU tests check the whole path.

Attention-probability dropout: torch 2.13's `varlen_attn` hard-codes dropout_p = 0 (its custom op
calls the flash kernel with 0.0 and returns no RNG state for backward). So this path applies no
attention dropout on ANY device (the reference kernel does not either): one set of flags trains the
same model on CPU and GPU. Hidden-state dropout (embeddings, attention output, FFN output) is
applied as usual. `--unpad auto` therefore unpads only models whose attention_probs_dropout_prob
is 0; `--unpad on` trades that dropout for speed and says so (cpt/training/session.py: resolve_unpad).

Host-device syncs: every index tensor whose size depends on the data (the real tokens, the masked
rows) is a sync when it is computed on the GPU. `unpadding_metadata` computes them on the host, in the
loader processes (cpt/training/batches.py, `StepBatching(unpadding_metadata=True)`), so the CUDA step has no
`.item()`/`int()` of a device tensor: it gathers with `index_select` and gives the kernel the batch's
padded width as a static max_seqlen.

    metadata = unpadding_metadata(attention_mask, labels)            # host, in the loader
    hidden = unpadded_encoder(model.bert, input_ids, metadata)       # (N, H) real tokens
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from cpt.training.cpu import attention_with_dropout

IGNORE_INDEX = -100  # as cpt.training.model.IGNORE_INDEX (not imported: cpt.training.model imports this module)
METADATA_KEYS = ("cu_seqlens", "token_index", "position_ids", "masked_index", "masked_token_index", "masked_labels")


def supports_unpadding(model: torch.nn.Module) -> bool:
    """BERT's absolute positions start at 0 for every sequence; RoBERTa-style offsets are not handled."""
    return getattr(model.config, "model_type", None) == "bert" and hasattr(model, "bert")


def attention_dropout_p(model: torch.nn.Module) -> float:
    """The model's attention-probability dropout (what the unpadded path leaves out)."""
    return float(getattr(model.config, "attention_probs_dropout_prob", 0.0) or 0.0)


FLASH_MIN_CAPABILITY = (8, 0)  # flash attention 2 in PyTorch: Ampere or newer
FLASH_PRECISIONS = ("bf16", "fp16")


def flash_varlen_unusable(device: torch.device, precision: str) -> str | None:
    """Why the flash varlen kernel cannot run here (None when it can): CUDA, sm80+, bf16/fp16 autocast."""
    if device.type != "cuda":
        return f"no flash varlen attention on {device.type}"
    if precision not in FLASH_PRECISIONS:
        return f"flash varlen attention takes only bf16/fp16, and the precision is {precision}"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FLASH_MIN_CAPABILITY:
        return (f"flash varlen attention needs compute capability >= 8.0, and "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def reference_varlen_attention(query, key, value, cu_seqlens: torch.Tensor, max_len: int,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """(N, heads, d) attention per sequence, by padding to (B, heads, T, d): for CPU and tests.

    Pads to the longest sequence present (max_len may be a static upper bound)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    batch, heads, head_dim = len(lengths), query.shape[1], query.shape[2]
    max_len = max(lengths, default=0)
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
    """The flash kernel (no dropout in torch 2.13's varlen_attn; the unpadded path passes 0)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(query, key, value, cu, cu, max_len, max_len)


def pick_attention(device: torch.device):
    return flash_varlen_attention if device.type == "cuda" else reference_varlen_attention


def unpadding_metadata(attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The index tensors of a right-padded (B, T) batch that the step needs: cheap on the host, each a
    host-device sync if computed on the GPU (their sizes depend on the data).

    cu_seqlens (B + 1,) int32; token_index (N,) the real tokens' positions in the flattened (B * T) batch;
    position_ids (N,) each real token's position in its sequence; masked_index (M,) the masked positions in
    (B * T) (padded path); masked_token_index (M,) the same among the N real tokens (unpadded path);
    masked_labels (M,) their labels. int64 but cu_seqlens."""
    keep = attention_mask.reshape(-1).bool()  # (B * T,)
    lengths = attention_mask.bool().sum(dim=1)  # (B,)
    token_index = keep.nonzero().squeeze(1)  # (N,)
    flat_labels = labels.reshape(-1)
    masked_index = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    return {
        "cu_seqlens": F.pad(torch.cumsum(lengths, dim=0), (1, 0)).to(torch.int32),
        "token_index": token_index,
        "position_ids": token_index % attention_mask.shape[1],
        "masked_index": masked_index,
        "masked_token_index": (flat_labels.index_select(0, token_index) != IGNORE_INDEX).nonzero().squeeze(1),
        "masked_labels": flat_labels.index_select(0, masked_index),
    }


def unpadded_encoder(bert: torch.nn.Module, input_ids: torch.Tensor, metadata: dict[str, torch.Tensor],
                     attention=None) -> torch.Tensor:
    """Last hidden states of the real tokens (N, H), given the batch's `unpadding_metadata`.

    Assumes right padding (cpt's batches): sequence b's tokens are positions 0..len_b-1."""
    attention = attention or pick_attention(input_ids.device)
    cu_seqlens = metadata["cu_seqlens"]  # (B + 1,) int32
    # Static: the padded width bounds every length, is known on the host and takes few values (multiples of 16).
    max_len = input_ids.shape[1]
    token_ids = input_ids.reshape(-1).index_select(0, metadata["token_index"])  # (N,)
    hidden = bert.embeddings(input_ids=token_ids[None], position_ids=metadata["position_ids"][None],
                             token_type_ids=torch.zeros_like(token_ids)[None])[0]  # (N, H)
    for layer in bert.encoder.layer:
        # transformers 5 marks each layer when activation checkpointing is on.
        if bert.training and getattr(layer, "gradient_checkpointing", False):
            hidden = torch.utils.checkpoint.checkpoint(_layer_forward, layer, hidden, cu_seqlens, max_len, attention,
                                                       use_reentrant=False)
        else:
            hidden = _layer_forward(layer, hidden, cu_seqlens, max_len, attention)
    return hidden


def _layer_forward(layer, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, attention) -> torch.Tensor:
    """One BertLayer on (N, H) real tokens."""
    self_attention = layer.attention.self
    heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
    tokens = hidden.shape[0]
    query = self_attention.query(hidden).view(tokens, heads, head_dim)
    key = self_attention.key(hidden).view(tokens, heads, head_dim)
    value = self_attention.value(hidden).view(tokens, heads, head_dim)
    # No attention-probability dropout on this path, on any device (module docstring).
    context = attention(query, key, value, cu_seqlens, max_len, 0.0).reshape(tokens, heads * head_dim)
    attention_output = layer.attention.output(context, hidden)
    return layer.output(layer.intermediate(attention_output), attention_output)
