"""What the library needs to know per architecture, as data keyed by ``config.model_type``.

``FFN_MODULES``: the module whose output is a block's feed-forward output, as a regex on module
names with the block index as group 1 — what ILKD's ``ffn`` term matches (hidden states and
attention come from transformers' own ``output_hidden_states`` / ``output_attentions``).

``BERT_LAYOUT``: encoders whose modules below the base model have BERT's names
(``embeddings.word_embeddings``, ``encoder.layer.<i>.attention.self.query``…), so that the
KroneckerBERT presets apply to them as they are (``kronecker_bert_from_bert`` compresses them
through ``kroneckerize``). A new architecture is an entry here, not a file.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["BERT_LAYOUT", "FFN_MODULES", "PAPER_FAMILY", "PAPER_PRESETS", "ffn_pattern"]

_DECODER_MLP = r"(?:^|\.)layers\.(\d+)\.mlp$"

FFN_MODULES: dict[str, str] = {
    # GPT-2 family: the MLP before the residual add
    "gpt2": r"(?:^|\.)h\.(\d+)\.mlp$",
    "kngpt2": r"(?:^|\.)h\.(\d+)\.mlp$",
    # BERT family: dense, dropout, residual add and LayerNorm, i.e. the layer output
    "bert": r"(?:^|\.)layer\.(\d+)\.output$",
    "kronecker-bert": r"(?:^|\.)layer\.(\d+)\.output$",
    "roberta": r"(?:^|\.)layer\.(\d+)\.output$",
    "xlm-roberta": r"(?:^|\.)layer\.(\d+)\.output$",
    "electra": r"(?:^|\.)layer\.(\d+)\.output$",
    "distilbert": r"(?:^|\.)layer\.(\d+)\.ffn$",
    # decoder LLMs: the gated / plain MLP before the residual add
    "llama": _DECODER_MLP,
    "mistral": _DECODER_MLP,
    "qwen2": _DECODER_MLP,
    "phi3": _DECODER_MLP,
    "gemma": _DECODER_MLP,
    "gemma2": _DECODER_MLP,
    "gpt_neox": _DECODER_MLP,
    "opt": r"(?:^|\.)layers\.(\d+)\.fc2$",
}


BERT_LAYOUT: tuple[str, ...] = ("roberta", "xlm-roberta", "electra")

#: The paper presets of each family, the default first (``kngpt2_from_gpt2`` / ``kronecker_bert_from_bert``).
PAPER_PRESETS: dict[str, tuple[str, ...]] = {"gpt2": ("paper",), "bert": ("kroneckerbert8", "kroneckerbert21")}

#: Which paper family's presets a ``model_type`` takes (dense teachers and the paper students).
PAPER_FAMILY: dict[str, str] = {"gpt2": "gpt2", "kngpt2": "gpt2", "bert": "bert", "kronecker-bert": "bert",
                                **{model_type: "bert" for model_type in BERT_LAYOUT}}


def ffn_pattern(model_type: Optional[str]) -> Optional[re.Pattern]:
    """The compiled FFN-output pattern for ``model_type``, or ``None`` when the table lacks it."""
    pattern = FFN_MODULES.get(model_type or "")
    return None if pattern is None else re.compile(pattern)
