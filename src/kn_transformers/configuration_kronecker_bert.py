"""KroneckerBERT configuration: a ``BertConfig`` plus the Kronecker form of each compressed matrix.

Imports transformers and the standard-library validator ``factor_spec`` only, so that it travels
with saved model code (``trust_remote_code``).
"""

import re

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from .factor_spec import canonical_factor_spec

#: Names, relative to the base model, of the matrices KroneckerBERT may compress, per layer.
LAYER_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
WORD_EMBEDDINGS = "embeddings.word_embeddings"
_LAYER_KEY = re.compile(r"^encoder\.layer\.(0|[1-9][0-9]*)\.(.+)$")


def _matrix_shape(config, name):
    """The ``(out, in)`` weight shape of ``name`` (``(vocab, hidden)`` for the embedding)."""
    d, f = config.hidden_size, config.intermediate_size
    if name == WORD_EMBEDDINGS:
        return config.vocab_size, d
    sub = _LAYER_KEY.match(name).group(2)
    return {"intermediate.dense": (f, d), "output.dense": (d, f)}.get(sub, (d, d))


@strict
class KroneckerBertConfig(BertConfig):
    r"""Configuration of a KroneckerBERT model: BERT whose chosen matrices are sums of Kronecker products.

    Every field of [`BertConfig`] keeps its meaning. The compressed matrices are listed in
    ``kronecker_factors``, keyed by their module name inside the base model:

    - ``"embeddings.word_embeddings"`` (``vocab × hidden``; ``m1`` may be any value up to the
      vocabulary size, the table is padded to ``m1 * ceil(vocab / m1)`` rows; the paper's split
      is ``A: vocab × hidden/n``, ``B: 1 × n``),
    - ``"encoder.layer.{i}.attention.self.{query,key,value}"`` and
      ``"encoder.layer.{i}.attention.output.dense"`` (``hidden × hidden``, heads concatenated),
    - ``"encoder.layer.{i}.intermediate.dense"`` (FFN in, ``intermediate × hidden``) and
      ``"encoder.layer.{i}.output.dense"`` (FFN out, ``hidden × intermediate``).

    Each value is ``{"a_shape": [m1, n1], "rank": r}``: the weight ``W`` (``out × in``, the
    ``nn.Linear`` layout) is ``Σ_{k<r} A_k ⊗ B_k`` with ``A_k`` of shape ``m1 × n1`` and ``B_k``
    of shape ``out/m1 × in/n1``. Modules not listed stay dense. Lists, not tuples, so that the
    JSON round trip is exact; tuples given here are converted.

    Args:
        kronecker_factors: the map above; ``None`` or ``{}`` is plain BERT.
        kronecker_preset: informational name of the preset the map came from (e.g. ``"kroneckerbert8"``).

    Raises ``ValueError`` naming the offending entry when a name is unknown, a layer index is out
    of range, ``a_shape`` does not divide the matrix, or the rank is not in ``[1, min(m1·n1, m2·n2)]``.
    """

    model_type = "kronecker-bert"

    kronecker_factors: dict | None = None
    kronecker_preset: str | None = None

    def __post_init__(self, **kwargs):
        if not isinstance(self.kronecker_factors or {}, dict):
            raise ValueError("kronecker_factors must be a dict of module name -> spec, got "
                             f"{type(self.kronecker_factors).__name__}")
        super().__post_init__(**kwargs)
        self.validate_kronecker_factors()

    def validate_kronecker_factors(self):
        """Check every entry of ``kronecker_factors`` against the model shapes and store the map in
        canonical form, embedding first then layers in forward order (also run on save)."""
        normalized = {}
        for name, spec in (self.kronecker_factors or {}).items():
            field = f"kronecker_factors[{name!r}]"
            if name != WORD_EMBEDDINGS:
                match = _LAYER_KEY.match(name)
                if match is None or match.group(2) not in LAYER_MODULES:
                    raise ValueError(
                        f"{field}: unknown module; use {WORD_EMBEDDINGS!r} or 'encoder.layer.<i>.<m>' with <m> one of "
                        f"{', '.join(LAYER_MODULES)}"
                    )
                layer = int(match.group(1))
                if layer >= self.num_hidden_layers:
                    raise ValueError(
                        f"{field}: layer {layer} is out of range; the model has num_hidden_layers="
                        f"{self.num_hidden_layers} (layers 0..{self.num_hidden_layers - 1})"
                    )
            kind = "embedding" if name == WORD_EMBEDDINGS else "linear"
            normalized[name] = canonical_factor_spec(spec, _matrix_shape(self, name), kind, field)
        self.kronecker_factors = dict(sorted(normalized.items(), key=lambda kv: _sort_key(kv[0])))

    def kronecker_spec(self, name):
        """``(a_shape, rank)`` of module ``name`` or ``None`` when it stays dense."""
        spec = (self.kronecker_factors or {}).get(name)
        return None if spec is None else (tuple(spec["a_shape"]), spec["rank"])


def _sort_key(name):
    """Embedding first, then layers in numeric order, modules in forward order."""
    match = _LAYER_KEY.match(name)
    if match is None:
        return (-1, 0, name)
    sub = match.group(2)
    return (int(match.group(1)), LAYER_MODULES.index(sub) if sub in LAYER_MODULES else len(LAYER_MODULES), sub)


__all__ = ["KroneckerBertConfig"]
