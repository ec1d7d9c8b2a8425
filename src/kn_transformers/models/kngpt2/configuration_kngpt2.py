"""Configuration of KnGPT2: GPT-2 with some of its matrices stored as Kronecker products.

A :class:`KnGPT2Config` is a :class:`~transformers.GPT2Config` plus a map saying which
matrices are Kronecker products ``Σ_r A_r ⊗ B_r`` and with which factor shapes. Everything
else (sizes, dropout, tokens, attention implementation) means what it means for GPT-2.

This file imports transformers and the standard-library validator ``factor_spec`` only, so that it
can travel next to the modeling file when a model is saved with its code (``trust_remote_code``).
"""

from typing import Any

from transformers import GPT2Config

from ...core.factor_spec import FactorMapLayout

__all__ = ["KnGPT2Config", "KNGPT2_LAYER_MODULES"]

#: The per-layer matrices that may be Kronecker, relative to a block ``h.<i>``.
KNGPT2_LAYER_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class KnGPT2Config(GPT2Config):
    r"""GPT-2 configuration with Kronecker-factored matrices.

    kronecker_factors (`dict[str, dict]`, *optional*):
        Which matrices are Kronecker products, keyed by their path inside the transformer:
        ``"wte"`` (token embedding, ``(vocab_size, n_embd)``) and ``"h.<i>.attn.c_attn"``
        (fused QKV, ``(3·n_embd, n_embd)``), ``"h.<i>.attn.c_proj"`` (``(n_embd, n_embd)``),
        ``"h.<i>.mlp.c_fc"`` (``(n_inner, n_embd)``), ``"h.<i>.mlp.c_proj"`` (``(n_embd, n_inner)``).
        Shapes are ``(out, in)`` (``nn.Linear`` layout, although GPT-2 stores ``Conv1D`` as
        in × out). Each value is ``{"a_shape": [m1, n1], "rank": r}``: ``A`` is ``m1×n1``,
        ``B`` is ``(out/m1)×(in/n1)``, ``r`` terms are summed (default 1). For ``"wte"``,
        ``m1`` need not divide the vocabulary (the table is padded with unreachable rows,
        see ``KroneckerEmbedding``). ``None`` or ``{}``: plain GPT-2.
    kronecker_normalize (`bool`, *optional*, defaults to `False`):
        Records whether the factors were initialised with Frobenius-norm rescaling
        (Krony-PT's adaptive normalisation). Informational: it does not change the forward.
    tie_word_embeddings (`bool`, *optional*, defaults to `True`):
        As for GPT-2. With a Kronecker ``"wte"``: `True` ties the LM head to the Kronecker
        embedding and computes logits factored (``KroneckerEmbedding.logits``, no ``V×d``
        matrix and no ``lm_head`` weight); `False` gives a dense, untied ``lm_head`` (the
        KnGPT2 paper's choice).

    Invalid maps (unknown module name, layer index out of range, shapes that do not divide,
    a bad rank) raise ``ValueError`` naming the offending ``kronecker_factors`` entry.
    """

    model_type = "kngpt2"

    kronecker_factors: dict[str, dict[str, Any]] | None = None
    kronecker_normalize: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.kronecker_factors = self._normalized_kronecker_factors()

    # ------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------

    def factor_layout(self) -> FactorMapLayout:
        """The Kronecker-able matrices of this configuration and their ``(out, in)`` shapes."""
        d = self.n_embd
        inner = self.n_inner if self.n_inner is not None else 4 * d
        shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (inner, d), "mlp.c_proj": (d, inner)}
        return FactorMapLayout(embedding=("wte", (self.vocab_size, d)), layer_prefix="h.",
                               layer_shapes={name: shapes[name] for name in KNGPT2_LAYER_MODULES},
                               num_layers=self.n_layer, num_layers_field="n_layer")

    def module_shape(self, name: str) -> tuple[int, int]:
        """``(out, in)`` of the matrix at ``name`` (``(vocab_size, n_embd)`` for ``"wte"``).

        Raises ``ValueError`` for a name that is not one of the Kronecker-able matrices or a
        layer index outside ``[0, n_layer)``.
        """
        return self.factor_layout().shape(name)

    def kronecker_spec(self, name: str) -> dict[str, Any] | None:
        """``{"a_shape": [m1, n1], "rank": r}`` for the matrix at ``name``, or ``None`` if dense."""
        return (self.kronecker_factors or {}).get(name)

    def _normalized_kronecker_factors(self) -> dict[str, dict[str, Any]] | None:
        """``kronecker_factors`` validated and in canonical JSON-able form (``None`` stays ``None``);
        ``ValueError`` naming the entry for anything invalid."""
        if self.kronecker_factors is None:
            return None
        return self.factor_layout().canonical(self.kronecker_factors)

