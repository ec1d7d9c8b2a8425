"""``KroneckerConfig``: which modules of a model become Kronecker layers, with which factor shapes.

The config follows PEFT's targeting conventions (``target_modules``, ``exclude_modules``,
``layers``, ``rank_pattern``) and is what ``kroneckerize`` reads and what a compressed model's
``config.json`` carries as its ``quantization_config`` (``quant_method: "kn-transformers"``), so that
``AutoModelFor<Task>.from_pretrained`` rebuilds the same layers (see :mod:`.hf_quantizer`).
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["KroneckerConfig", "QUANT_METHOD", "is_kroneckerized"]

#: ``quantization_config.quant_method`` of a compressed model's ``config.json``. Named after the
#: package, as transformers' own methods are (bitsandbytes, torchao, compressed-tensors): without
#: it installed, transformers' "Unknown quantization type, got kn-transformers" says what is missing.
QUANT_METHOD = "kn-transformers"

def is_kroneckerized(model) -> bool:
    """Whether ``model`` (or a config) carries a ``quantization_config`` of this package, i.e. was
    made by ``kroneckerize`` (as an object or, before it is parsed, as a dict)."""
    config = getattr(model, "config", model)
    quantization = getattr(config, "quantization_config", None)
    method = (quantization.get("quant_method") if isinstance(quantization, dict)
              else getattr(quantization, "quant_method", None))
    return method == QUANT_METHOD


INITS = ("svd", "activation", "random")
TIED_HEADS = ("factored", "dense")


def _as_pair(value, what: str) -> list[int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{what} must be two positive integers [m1, n1], got {value!r}")
    return [int(value[0]), int(value[1])]


def _as_rank(value, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _as_names(value, what: str) -> Union[None, str, list[str]]:
    """``None``, a regex string (or ``"all-linear"``), or a list of module names / name suffixes."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{what}: {value!r} is not a valid regular expression ({err})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(f"{what} must be a list of module names, a regex string or 'all-linear', got {value!r}")


@dataclass
class KroneckerConfig(QuantizationConfigMixin):
    """What :func:`~kn_transformers.kroneckerize` compresses and how.

    Targeting (PEFT's rules):
        target_modules: a list of module names or name suffixes (``["q_proj", "v_proj"]`` matches
            ``model.layers.3.self_attn.q_proj``), a regex matched against the full name, or
            ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` of the base model, i.e. not the output
            head nor a task head (a classifier has too few rows to factor usefully).
        exclude_modules: names, suffixes or a regex taken out of the targets.
        layers: indices of the repeated blocks (``layers.<i>``, ``h.<i>``, ``layer.<i>``…) whose
            modules are targeted; modules outside any block (a pooler) are then left out.
        embedding: also compress the input token embedding (``get_input_embeddings()``).

    Shapes (exactly one of ``a_shape`` / ``fraction`` / ``budget``, or none when ``shape_pattern`` covers every target):
        a_shape: ``(m1, n1)`` of every ``A_r``; each matched ``(out, in)`` matrix must be divisible.
        fraction: per-matrix parameter fraction in (0, 1); each matrix gets
            ``choose_kronecker_factors(out, in, fraction)``'s split (the embedding the paper's
            ``V × d/n`` split with the smallest ``n`` that fits).
        budget: a global parameter budget instead of one rule for all: an int is the compressed
            model's total parameter count (tied weights once), a float in (0, 1) a fraction of the
            targeted matrices' parameters. Each matrix then gets the ``(a_shape, rank ≤ rank)`` that
            minimises the summed relative (activation-weighted with ``init="activation"``) error,
            never exceeding the budget (:mod:`.budget`).
        rank: Kronecker terms per matrix (with ``budget``: the largest rank considered).
        shape_pattern / rank_pattern: ``{regex: a_shape}`` / ``{regex: rank}`` overrides, matched as
            PEFT's ``rank_pattern`` (against the name's end, e.g. ``"mlp.down_proj"``).

    Init and head:
        init: ``"svd"`` (the papers' nearest Kronecker product of each weight), ``"activation"``
            (minimise the layer's output error ``‖(W − Σ A_r⊗B_r) X‖`` over calibration inputs ``X``:
            pass ``calibration_data`` to ``kroneckerize``; :mod:`.weighted_kronecker`) or ``"random"``.
        damping: with ``init="activation"``, the input covariance gets ``damping·mean(diag)`` added
            (GPTQ's ``percdamp``; larger moves the objective towards the plain SVD's).
        sequential: with ``init="activation"``, calibrate each block on the outputs of the already
            compressed blocks before it (GPTQ, SVD-LLM) instead of on the teacher's.
        normalize: rescale each product to its weight's Frobenius norm (Krony-PT).
        tied_head: for an output head tied to a compressed embedding: ``"factored"`` keeps it tied
            and computes logits from the factors (``KroneckerEmbedding.logits``, no ``V×d`` matrix);
            ``"dense"`` unties it and keeps the teacher's dense matrix.

    ``modules`` is filled by ``kroneckerize``: the resolved ``{name: {"kind", "shape", "a_shape",
    "rank"}}`` of every replaced module, which loading rebuilds exactly.
    """

    target_modules: Union[str, list[str], None] = "all-linear"
    exclude_modules: Union[str, list[str], None] = None
    layers: Optional[list[int]] = None
    embedding: bool = False
    a_shape: Optional[list[int]] = None
    fraction: Optional[float] = None
    budget: Union[int, float, None] = None
    rank: int = 1
    shape_pattern: dict[str, list[int]] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    init: str = "svd"
    damping: float = 0.01
    sequential: bool = False
    normalize: bool = False
    tied_head: str = "factored"
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        self.target_modules = _as_names(self.target_modules, "target_modules")
        self.exclude_modules = _as_names(self.exclude_modules, "exclude_modules")
        if self.target_modules is None and not self.embedding and not self.modules:
            raise ValueError("nothing to compress: give target_modules (e.g. 'all-linear') or embedding=True")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, numbers.Integral) else self.layers
            if (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")
                    or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in layers)):
                raise ValueError(f"layers must be a list of non-negative layer indices, got {self.layers!r}")
            self.layers = sorted({int(i) for i in layers})
        if not isinstance(self.embedding, bool):
            raise ValueError(f"embedding must be True or False, got {self.embedding!r}")
        if self.budget is not None:
            budget = self.budget
            if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or (
                    isinstance(budget, numbers.Integral) and budget < 1) or (
                    not isinstance(budget, numbers.Integral) and not 0 < budget < 1):
                raise ValueError(f"budget must be a parameter count (int >= 1) or a fraction in (0, 1), got {budget!r}")
            self.budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
        if not self.modules:  # a resolved config needs none
            given = [k for k in ("a_shape", "fraction", "budget") if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"give exactly one of a_shape=(m1, n1), fraction=... or budget=... ({' and '.join(given)} were given)")
            if not given and not self.shape_pattern:
                raise ValueError("give exactly one of a_shape=(m1, n1), fraction=... or budget=... (none was given; "
                                 "or a shape_pattern for every target)")
            if self.budget is not None and (self.shape_pattern or self.rank_pattern):
                raise ValueError("budget chooses every matrix's shape and rank: leave shape_pattern/rank_pattern out")
        if self.a_shape is not None:
            self.a_shape = _as_pair(self.a_shape, "a_shape")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, numbers.Real) or not 0 < self.fraction < 1:
                raise ValueError(f"fraction must be a number in (0, 1), got {self.fraction!r}")
            self.fraction = float(self.fraction)
        self.rank = _as_rank(self.rank, "rank")
        self.shape_pattern = {k: _as_pair(v, f"shape_pattern[{k!r}]") for k, v in dict(self.shape_pattern or {}).items()}
        self.rank_pattern = {k: _as_rank(v, f"rank_pattern[{k!r}]") for k, v in dict(self.rank_pattern or {}).items()}
        for pattern in (*self.shape_pattern, *self.rank_pattern):
            _as_names(pattern, "a shape_pattern/rank_pattern key")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        if self.normalize and self.init == "activation":
            raise ValueError("normalize=True rescales to the weight's norm, which init='activation' does not aim at; "
                             "use one of them")
        if isinstance(self.damping, bool) or not isinstance(self.damping, numbers.Real) or self.damping < 0:
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}")
        self.damping = float(self.damping)
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        if self.sequential and self.init != "activation":
            raise ValueError("sequential=True is a calibration scheme: it needs init='activation'")
        if self.tied_head not in TIED_HEADS:
            raise ValueError(f"tied_head must be one of {TIED_HEADS}, got {self.tied_head!r}")
        self.modules = {name: self._check_entry(name, spec) for name, spec in dict(self.modules or {}).items()}

    @staticmethod
    def _check_entry(name: str, spec) -> dict[str, Any]:
        what = f"modules[{name!r}]"
        if not isinstance(spec, dict) or set(spec) != {"kind", "shape", "a_shape", "rank"}:
            raise ValueError(f"{what} must be a dict with keys kind, shape, a_shape, rank; got {spec!r}")
        if spec["kind"] not in ("linear", "embedding", "tied_head"):
            raise ValueError(f"{what}.kind must be 'linear', 'embedding' or 'tied_head', got {spec['kind']!r}")
        return {"kind": spec["kind"], "shape": _as_pair(spec["shape"], f"{what}.shape"),
                "a_shape": _as_pair(spec["a_shape"], f"{what}.a_shape"), "rank": _as_rank(spec["rank"], f"{what}.rank")}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """As transformers' quantization configs: unknown keys are an error, not silently dropped."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - names)
        if unknown:
            raise ValueError(f"KroneckerConfig: unknown field(s) {unknown}; known: {', '.join(sorted(names))}")
        config = cls(**config_dict)
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for k, v in kwargs.items():
            if k not in unused:
                setattr(config, k, v)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls, path: str) -> "KroneckerConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other) -> bool:
        return isinstance(other, KroneckerConfig) and self.to_dict() == other.to_dict()
