"""The ILKD loss terms, one pure function each.

Shapes: ``B`` batch, ``L`` sequence, ``H`` heads, ``D`` width, ``V`` vocabulary/classes.
Masks are boolean, ``True`` where a position takes part; masked positions never contribute,
and every term is a mean over the positions that do (so it does not depend on padding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` (broadcast to ``values``) is True."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    count = mask.sum()
    return torch.where(mask, values, values.new_zeros(())).sum() / count.clamp_min(1)


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, token_mask: Optional[torch.Tensor] = None, normalize: bool = False
) -> torch.Tensor:
    """MSE between hidden states ``(B, L, D)`` over the valid tokens ``token_mask`` ``(B, L)``.

    Averaged over valid tokens and over ``D``: used for the embedding output, each layer's
    hidden state and each FFN output. The student must already be projected to ``D``.

    ``normalize=True`` divides by the teacher feature's mean square over the same entries
    (a relative squared error: 1 for a student that outputs zeros, whatever the layer's scale),
    so that terms of layers with large activations (BERT's last layers, GPT-2's residual stream)
    do not outweigh the others and the task loss.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    t = teacher.float()
    mask = None if token_mask is None else token_mask[..., None].bool()
    mse = _masked_mean((student.float() - t).pow(2), mask)
    if normalize:
        mse = mse / _masked_mean(t.pow(2), mask).detach().clamp_min(1e-12)
    return mse


def attention_valid_mask(attention_mask: Optional[torch.Tensor], seq_len: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean ``(B|1, 1, L, L)``: query and key are real tokens and, if ``causal``, key ≤ query."""
    if attention_mask is None:
        valid = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device)
    else:
        am = attention_mask.bool()
        valid = am[:, None, :, None] & am[:, None, None, :]
    if causal:
        valid = valid & torch.ones(seq_len, seq_len, dtype=torch.bool, device=valid.device).tril()
    return valid


def attention_score_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE between pre-softmax attention scores ``(B, H, L, L)`` (KroneckerBERT).

    Only (query, key) pairs in ``valid`` count: masked scores hold the mask's huge negative
    value in both models and would otherwise dominate.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    diff = torch.where(valid, student.float() - teacher.float(), student.new_zeros((), dtype=torch.float32))
    return _masked_mean(diff.pow(2), valid)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions, from pre-softmax scores ``(B, H, L, L)`` (KnGPT2).

    Each distribution is the softmax over the valid keys of a query; the KL is averaged over
    the (batch, head, query) rows that have a valid query.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    valid = valid.expand_as(student)
    row_valid = valid.any(-1)  # (B, H, L)
    neg = torch.finfo(torch.float32).min
    # rows without any valid key are filled with zeros (uniform, finite) and dropped below
    s = torch.where(valid, student.float(), torch.where(row_valid[..., None], neg, 0.0))
    t = torch.where(valid, teacher.float(), torch.where(row_valid[..., None], neg, 0.0))
    log_s = F.log_softmax(s, dim=-1)
    log_t = F.log_softmax(t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~valid, 0.0).sum(-1)
    return _masked_mean(kl, row_valid)


def logits_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft-label term ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` over the last axis.

    ``student``/``teacher``: ``(B, V)`` for classification or ``(B, L, V)`` for language
    modelling; ``mask`` ``(B, L)`` selects the positions that count (mean over them).
    The ``T²`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"logits differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}; "
            "student and teacher must share the vocabulary / label set"
        )
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _masked_mean(kl, None if mask is None else mask.bool()) * temperature**2


def logits_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Soft-label term for regression heads (``num_labels == 1``, e.g. STS-B): MSE of the predictions."""
    if student.shape != teacher.shape:
        raise ValueError(f"predictions differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    return F.mse_loss(student.float(), teacher.float())
