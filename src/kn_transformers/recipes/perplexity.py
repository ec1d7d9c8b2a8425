"""Sliding-window perplexity of any causal LM (dense or Kronecker)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def sliding_window_perplexity(
    model,
    input_ids: torch.Tensor,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict:
    """Perplexity of ``input_ids`` (1-D, one long token stream) with overlapping windows.

    Each window holds ``max_length`` tokens (default: the model's context) and moves by
    ``stride`` (default ``max_length``, i.e. no overlap); only the tokens a window adds are
    scored, each conditioned on up to ``max_length - 1`` earlier tokens. Every token after
    the first is scored once when ``stride < max_length``; with ``stride == max_length`` the
    first token of each window has no context and is not scored (as in the Transformers
    perplexity guide). Returns ``{"perplexity", "nll", "tokens"}`` (tokens scored).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one 1-D token stream, got shape {tuple(input_ids.shape)}")
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    max_length = max_length or ctx
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if max_length > ctx:
        raise ValueError(f"max_length {max_length} exceeds the model's context of {ctx} positions")
    device = next(model.parameters()).device
    n = input_ids.numel()
    # windows: (begin, end, first scored position)
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not show_progress):
        chunk = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (b, e, _) in enumerate(chunk):
            ids[j, : e - b] = input_ids[b:e]
            mask[j, : e - b] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        for j, (b, e, first) in enumerate(chunk):
            scored = logp[j, first - b - 1 : e - b - 1]
            nll -= scored.sum().item()
            count += scored.numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / max(count, 1)), "nll": nll / max(count, 1), "tokens": count}
