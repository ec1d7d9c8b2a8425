"""``DistillationArguments``: ``TrainingArguments`` plus the ILKD settings, and the papers' presets."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

# The loss of each paper (all terms weight 1 where the paper uses them).
# KnGPT2 (Edalati et al. 2022): MSE on the embedding output and on every layer's hidden state,
# KL between attention distributions, KD on logits, cross-entropy on labels.
# KroneckerBERT (Tahaei et al. 2022): MSE on the embedding output, on pre-softmax attention
# scores and on each layer's FFN output, KD on logits, cross-entropy on labels.
# The papers sum raw MSEs over layers, so a term's scale is the layer's activation scale times
# the depth (BERT's attention-score MSE: 10-35x the label loss).
# "balanced" puts every term on the label loss's scale: each feature MSE
# relative to the teacher feature's mean square, attention as KL between distributions (bounded by
# construction), each averaged over the mapped layers, so the sum of intermediate terms does not
# grow with depth; and TinyBERT's split of task distillation in one run: the intermediate terms
# alone for the first half of the steps, then the prediction terms (soft and hard labels) alone.
# "balanced_augmented": balanced's terms at constant weights, plus TinyBERT-style data augmentation
# without labels: every step also distils the teacher on a copy of the batch with a quarter of its
# tokens masked, so the student meets the teacher on inputs beyond the labelled rows.
# "recommended" (run_glue's default with a teacher): balanced_augmented without the embedding term, and
# the intermediate terms fading linearly to 0 over training (the soft and hard labels keep their weight).
# A factored embedding cannot reach the teacher's (every row of A ⊗ B lies in one small subspace: its
# relative error stays near 0.9 however long it trains), so that term only pulls the embedding away
# from what the layers above need. The intermediate matches guide the student early; by the end only
# the task is trained, so they no longer pull against it. Measured with the README's glue command
# (8,000 SST-2 rows, 3 epochs, 3 seeds; RESULTS.md "Accuracy 3") it beats labels alone beyond two
# standard errors for kroneckerbert8 and kroneckerbert21; at constant weights kroneckerbert21 was
# within noise (also over 5 seeds).
_PAPER = dict(feature_normalization="none", layer_reduction="sum", intermediate_schedule="constant",
              mask_augmentation=0.0)
_BALANCED = dict(
    embedding_weight=1.0, hidden_weight=1.0, attention_weight=1.0, ffn_weight=0.0,
    logits_weight=1.0, labels_weight=1.0, attention_loss="kl", temperature=1.0,
    feature_normalization="teacher", layer_reduction="mean", intermediate_schedule="two_phase",
    mask_augmentation=0.0,
)
DISTILLATION_PRESETS: dict[str, dict] = {
    "kngpt2": dict(
        embedding_weight=1.0, hidden_weight=1.0, attention_weight=1.0, ffn_weight=0.0,
        logits_weight=1.0, labels_weight=1.0, attention_loss="kl", temperature=1.0, **_PAPER,
    ),
    "kroneckerbert": dict(
        embedding_weight=1.0, hidden_weight=0.0, attention_weight=1.0, ffn_weight=1.0,
        logits_weight=1.0, labels_weight=1.0, attention_loss="mse_scores", temperature=1.0, **_PAPER,
    ),
    "balanced": _BALANCED,
    "balanced_augmented": dict(_BALANCED, intermediate_schedule="constant", mask_augmentation=0.25),
}
DISTILLATION_PRESETS["recommended"] = dict(DISTILLATION_PRESETS["balanced_augmented"], embedding_weight=0.0,
                                           intermediate_schedule="linear_decay")
#: the preset run_glue.py uses when a teacher is given and no --distill_preset
RECOMMENDED_PRESET = "recommended"
# the loss used when no preset is given (unchanged until a study shows another one winning)
DEFAULT_PRESET = "kngpt2"
INTERMEDIATE_TERMS = ("embedding", "hidden", "attention", "ffn")
TEACHER_TERMS = INTERMEDIATE_TERMS + ("logits",)  # the terms that need the teacher (not the labels)
LOSS_TERMS = ("embedding", "hidden", "attention", "ffn", "logits", "labels")


@dataclass
class DistillationArguments(TrainingArguments):
    """``TrainingArguments`` with the intermediate-layer distillation settings.

    Every setting left unset takes the value of ``distill_preset`` (``"kngpt2"`` when no preset
    is given). ``"kngpt2"`` and ``"kroneckerbert"`` are the papers' losses; ``"balanced"`` puts
    every term on the label loss's scale; ``"balanced_augmented"`` adds masked copies of each batch;
    ``"recommended"`` (``run_glue.py``'s default with a teacher) is that without the embedding term and
    with the intermediate terms fading out over training (see ``DISTILLATION_PRESETS``). With ``HfArgumentParser``
    these are ``--distill_preset kroneckerbert --hidden_weight 0.5 ...`` flags, or keys of a JSON
    file.
    """

    distill_preset: Optional[str] = field(
        default=None, metadata={"help": f"loss of a paper: one of {sorted(DISTILLATION_PRESETS)}"}
    )
    embedding_weight: Optional[float] = field(default=None, metadata={"help": "MSE on the embedding output"})
    hidden_weight: Optional[float] = field(default=None, metadata={"help": "MSE on each mapped layer's hidden state"})
    attention_weight: Optional[float] = field(default=None, metadata={"help": "attention term (see attention_loss)"})
    ffn_weight: Optional[float] = field(default=None, metadata={"help": "MSE on each mapped layer's FFN output"})
    logits_weight: Optional[float] = field(default=None, metadata={"help": "soft labels: KL (MSE for regression)"})
    labels_weight: Optional[float] = field(default=None, metadata={"help": "hard labels: the student's own loss"})
    attention_loss: Optional[str] = field(
        default=None,
        metadata={"help": "'kl' between attention distributions (KnGPT2) or 'mse_scores' on pre-softmax scores "
                          "(KroneckerBERT)"},
    )
    temperature: Optional[float] = field(default=None, metadata={"help": "softmax temperature of the logits term"})
    feature_normalization: Optional[str] = field(
        default=None,
        metadata={"help": "'teacher': each feature MSE relative to the teacher feature's mean square; 'none': raw MSE "
                          "(the papers)"},
    )
    layer_reduction: Optional[str] = field(
        default=None, metadata={"help": "'mean' or 'sum' (the papers) of a layer term over the mapped layers"})
    intermediate_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "'linear_decay': the intermediate terms' weights fall linearly to 0 over training (the "
                          "task terms keep theirs); 'two_phase': the intermediate terms alone for the first half of training, "
                          "then the task terms alone (TinyBERT); 'constant' (the papers)"},
    )
    mask_augmentation: Optional[float] = field(
        default=None,
        metadata={"help": "> 0: each training step also distils the teacher (every term but the labels) on a copy "
                          "of the batch with this fraction of its non-special tokens replaced by the tokenizer's "
                          "mask token, or by random tokens where it has none (TinyBERT-style augmentation; needs "
                          "processing_class=tokenizer); 0: off"},
    )
    layer_map: str = field(
        default="one_to_one",
        metadata={"help": "'one_to_one', 'uniform' (TinyBERT: student layer i <- teacher layer i*N/M), or a "
                          "JSON list of [student_layer, teacher_layer] pairs, 1-based"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.distill_preset is not None and self.distill_preset not in DISTILLATION_PRESETS:
            raise ValueError(
                f"distill_preset {self.distill_preset!r} is unknown; use one of {sorted(DISTILLATION_PRESETS)} or None"
            )
        self.distill_preset = self.distill_preset or DEFAULT_PRESET
        preset = DISTILLATION_PRESETS[self.distill_preset]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, allowed in (("attention_loss", ("kl", "mse_scores")), ("feature_normalization", ("teacher", "none")),
                              ("layer_reduction", ("mean", "sum")),
                              ("intermediate_schedule", ("constant", "linear_decay", "two_phase"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for term in LOSS_TERMS:
            value = getattr(self, f"{term}_weight")
            if not (_is_finite_number(value) and value >= 0):
                raise ValueError(f"{term}_weight must be a finite number >= 0, got {value!r}")
        if not (_is_finite_number(self.mask_augmentation) and 0 <= self.mask_augmentation < 1):
            raise ValueError(f"mask_augmentation must be a number in [0, 1), got {self.mask_augmentation!r}")
        if not (_is_finite_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        parse_layer_map(self.layer_map, 1, 1, check=False)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {term: getattr(self, f"{term}_weight") for term in LOSS_TERMS}


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_layer_map(spec, n_student: int, n_teacher: int, check: bool = True) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)``, 1-based (layer 0 is the embedding output).

    ``"one_to_one"`` needs equal depths; ``"uniform"`` maps student layer ``i`` to teacher
    layer ``i * n_teacher // n_student`` (TinyBERT); a non-empty list of ``[student, teacher]``
    pairs of ints ``>= 1`` (or its JSON) is taken as given. With ``check``, indices must also be
    within the depths; a malformed map is a ``ValueError`` either way.
    """
    expected = ("layer_map must be 'one_to_one', 'uniform' or a non-empty JSON list of [student_layer, "
                "teacher_layer] pairs of 1-based layer indices, e.g. [[1, 2], [2, 4]]")
    if isinstance(spec, str) and spec not in ("one_to_one", "uniform"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise ValueError(f"{expected}; got {spec!r}") from None
    if spec == "one_to_one":
        if check and n_student != n_teacher:
            raise ValueError(
                f"layer_map 'one_to_one' needs equal depths, but the student has {n_student} layers and the teacher "
                f"{n_teacher}; use layer_map='uniform' or an explicit list"
            )
        return [(i, i) for i in range(1, n_student + 1)]
    if spec == "uniform":
        if check and n_teacher % n_student:
            raise ValueError(
                f"layer_map 'uniform' needs the teacher depth ({n_teacher}) to be a multiple of the student's "
                f"({n_student}); give an explicit list instead"
            )
        return [(i, i * n_teacher // max(n_student, 1)) for i in range(1, n_student + 1)]
    if not (isinstance(spec, (list, tuple)) and spec and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_index, p)) for p in spec)):
        raise ValueError(f"{expected}; got {spec!r}")
    pairs = [(s, t) for s, t in spec]
    if check:
        for s, t in pairs:
            if not (1 <= s <= n_student and 1 <= t <= n_teacher):
                raise ValueError(
                    f"layer_map pair [{s}, {t}] is out of range: student layers are 1..{n_student}, "
                    f"teacher layers 1..{n_teacher}"
                )
    return pairs
