"""KroneckerBERT configuration: a ``BertConfig`` plus the Kronecker form of each compressed matrix.

Imports transformers and the standard-library validator ``factor_spec`` only, so that it travels
with saved model code (``trust_remote_code``).
"""

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from ...core.factor_spec import FactorMapLayout

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
        super().__post_init__(**kwargs)
        self.validate_kronecker_factors()

    def factor_layout(self) -> FactorMapLayout:
        """The Kronecker-able matrices of this configuration and their ``(out, in)`` shapes."""
        d, f = self.hidden_size, self.intermediate_size
        shapes = {"intermediate.dense": (f, d), "output.dense": (d, f)}
        return FactorMapLayout(embedding=(WORD_EMBEDDINGS, (self.vocab_size, d)), layer_prefix="encoder.layer.",
                               layer_shapes={name: shapes.get(name, (d, d)) for name in LAYER_MODULES},
                               num_layers=self.num_hidden_layers, num_layers_field="num_hidden_layers")

    def validate_kronecker_factors(self):
        """Check every entry of ``kronecker_factors`` against the model shapes and store the map in
        canonical form, embedding first then layers in forward order (also run on save)."""
        self.kronecker_factors = self.factor_layout().canonical(self.kronecker_factors)

    def kronecker_spec(self, name):
        """``(a_shape, rank)`` of module ``name`` or ``None`` when it stays dense."""
        spec = (self.kronecker_factors or {}).get(name)
        return None if spec is None else (tuple(spec["a_shape"]), spec["rank"])


__all__ = ["KroneckerBertConfig"]
