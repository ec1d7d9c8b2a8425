"""An attention implementation that returns pre-softmax attention scores.

KroneckerBERT distils the masked, pre-softmax scores ``QKᵀ/√d + mask``; KnGPT2 distils
attention distributions, which are ``softmax`` of the same scores. Registering it under
the name :data:`ATTENTION_SCORES_IMPLEMENTATION` (with the eager mask, so that padding and
causal masks are built exactly as for ``"eager"``) lets any Transformers model whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, BERT, and the Kronecker models
here) return them as ``outputs.attentions``::

    model.set_attn_implementation("kn_eager_scores")
    out = model(**batch, output_attentions=True)  # out.attentions[i]: (batch, heads, q, k) scores

Masked positions hold the mask's large negative value; ``softmax(scores, -1)`` gives the
probabilities that ``"eager"`` returns. Imports torch and transformers only, so that the
file can travel with saved model code.
"""

from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTENTION_SCORES_IMPLEMENTATION = "kn_eager_scores"


def eager_attention_with_scores(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention; returns ``(attn_output (B, Q, H, D), scores (B, H, Q, K))``.

    Grouped-query attention (Llama, Mistral, Qwen2…: fewer key/value heads than query heads)
    repeats each key/value head over its group, as transformers' eager attention does.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    # float32 at least (half precision overflows), float64 kept: its mask value would be -inf in float32
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = probs.to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    attn_output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return attn_output, scores


AttentionInterface.register(ATTENTION_SCORES_IMPLEMENTATION, eager_attention_with_scores)
AttentionMaskInterface.register(ATTENTION_SCORES_IMPLEMENTATION, eager_mask)
