"""``ILKDTrainer``: a ``transformers.Trainer`` that distils a student from a frozen teacher.

Both stages of both papers run through it: stage 1 on unlabelled text (causal- or
masked-LM batches) and stage 2 on a task (classification or regression). The loss is

    Σ_term weight_term · term

over the embedding output, the mapped layers' hidden states, attention (KL between
distributions or MSE on pre-softmax scores), FFN outputs, soft labels (logits) and hard
labels (the student's own loss); see :mod:`.losses`. The presets in :mod:`.arguments` set how
the terms are scaled (raw and summed over the mapped layers as in the papers, or ``"balanced"``:
relative to the teacher, averaged over layers, and ``intermediate_schedule`` deciding when the
intermediate terms count: always, fading linearly, or the first half of training only).
With ``mask_augmentation`` > 0 every training step adds the same sum, labels left out, over a
copy of the batch with that fraction of its tokens masked (TinyBERT-style augmentation).
Each term is logged raw (before its weight) at every logging step, for training and evaluation
(``loss_hidden``, ``eval_loss_hidden``, ``loss_augmented_hidden``, ...).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from dataclasses import fields
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from ..models.architectures import FFN_MODULES, ffn_pattern
from ..models.attention_scores import ATTENTION_SCORES_IMPLEMENTATION
from .arguments import INTERMEDIATE_TERMS, TEACHER_TERMS, DistillationArguments, parse_layer_map
from .losses import (
    attention_kl,
    attention_score_mse,
    attention_valid_mask,
    hidden_mse,
    logits_kl,
    logits_mse,
)

logger = logging.get_logger(__name__)

PROJECTIONS_ATTR = "ilkd_projections"
PROJECTIONS_FILE = "ilkd_projections.safetensors"


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's FFN-output module, in block order (per-model-type table, :mod:`..architectures`)."""
    pattern = ffn_pattern(getattr(model.config, "model_type", None))
    found = {}
    for name, module in ([] if pattern is None else model.named_modules()):
        m = pattern.search(name)
        if m:
            found[int(m.group(1))] = module
    return [found[i] for i in sorted(found)]


def _is_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _is_regression(model: nn.Module) -> bool:
    cfg = model.config
    return "ForSequenceClassification" in type(model).__name__ and (
        cfg.problem_type == "regression" or (cfg.problem_type is None and cfg.num_labels == 1)
    )


def _as_distillation_args(args: Optional[TrainingArguments]) -> DistillationArguments:
    if args is None:
        return DistillationArguments(output_dir="trainer_output")
    if isinstance(args, DistillationArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init and hasattr(args, f.name)}
    return DistillationArguments(**values)


class ILKDTrainer(Trainer):
    """``Trainer`` with intermediate-layer knowledge distillation from ``teacher_model``.

    Args:
        model: the student (e.g. a ``KnGPT2LMHeadModel`` or ``KroneckerBertForSequenceClassification``).
        args: :class:`DistillationArguments` (plain ``TrainingArguments`` get the default, KnGPT2-style, loss).
        teacher_model: the teacher, same tokenizer; frozen, kept in eval mode, placed by accelerate
            for inference only (never wrapped in DDP) and never saved.
        **kwargs: everything ``Trainer`` takes (datasets, collator, callbacks, ...).

    Where student and teacher widths differ, a learned linear projection per matched
    feature (``embedding``, ``hidden``, ``ffn``) maps the student's states to the teacher's
    width. It lives on the student as ``model.ilkd_projections``, so it is optimised, put in
    checkpoints and restored on resume like any weight; the final ``save_model`` writes the
    student without it and the projections beside it (``ilkd_projections.safetensors``).
    """

    # each term is a mean over this micro-batch: Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, model: PreTrainedModel = None, args: Optional[TrainingArguments] = None,
                 teacher_model: PreTrainedModel = None, **kwargs):
        if teacher_model is None:
            raise ValueError("ILKDTrainer needs teacher_model=: the model to distil from")
        if model is None:
            raise ValueError("ILKDTrainer needs model=: the student")
        args = _as_distillation_args(args)
        self.weights = args.loss_weights
        s_cfg, t_cfg = model.config, teacher_model.config
        self._check_compatible(model, teacher_model)
        # layers are matched only when a layer term is used (logits-only KD may change depth freely)
        layered = any(self.weights[t] > 0 for t in ("hidden", "attention", "ffn"))
        self.layer_pairs = (parse_layer_map(args.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
                            if layered else [])
        if self.weights["attention"] > 0:
            for who, m in (("student", model), ("teacher", teacher_model)):
                try:
                    m.set_attn_implementation(ATTENTION_SCORES_IMPLEMENTATION)
                except Exception as e:  # noqa: BLE001 - re-raised with the fix
                    raise ValueError(
                        f"the {who} ({type(m).__name__}) cannot return attention scores ({e}); "
                        "set attention_weight=0 or use a model whose attention goes through ALL_ATTENTION_FUNCTIONS"
                    ) from None
        if s_cfg.hidden_size != t_cfg.hidden_size:
            used = [t for t in ("embedding", "hidden", "ffn") if self.weights[t] > 0]
            if used and not hasattr(model, PROJECTIONS_ATTR):
                model.add_module(PROJECTIONS_ATTR, nn.ModuleDict(
                    {t: nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size) for t in used}
                ).to(device=model.device, dtype=model.dtype))
        if hasattr(model, PROJECTIONS_ATTR):
            # DDP's unused-parameter search starts from the model's outputs, which the projections
            # (applied in a hook, outside them) are not part of: it would mark them ready twice
            if args.ddp_find_unused_parameters:
                raise ValueError(
                    "ddp_find_unused_parameters=True cannot be used with width projections (student width "
                    f"{s_cfg.hidden_size}, teacher {t_cfg.hidden_size}); leave it unset"
                )
            args.ddp_find_unused_parameters = False
        self.causal = _is_causal(teacher_model)
        self.regression = _is_regression(model)
        if args.mask_augmentation > 0:
            self._mask_id, self._special_ids, self._vocab = self._mask_tokens(
                kwargs.get("processing_class"), args.mask_augmentation, s_cfg.vocab_size)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the student's label loss is a per-batch mean
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        # hooks live only for the duration of one compute_loss (see _capture): a teacher reused by
        # several trainers does not accumulate them
        self._ffn_outputs = {"student": [], "teacher": []}
        self._ffn_modules = {}
        if self.weights["ffn"] > 0:
            self._ffn_modules = {"student": self._find_ffn(model, "student"),
                                 "teacher": self._find_ffn(teacher_model, "teacher")}
        self._projected: dict = {}
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    # -- set-up ---------------------------------------------------------------------------

    def _check_compatible(self, student: nn.Module, teacher: nn.Module) -> None:
        s, t = student.config, teacher.config
        if getattr(s, "vocab_size", None) != getattr(t, "vocab_size", None):
            raise ValueError(
                f"student and teacher vocabularies differ (student {getattr(s, 'vocab_size', None)}, teacher "
                f"{getattr(t, 'vocab_size', None)}): both read the same input_ids, so build the student from this "
                "teacher or use one tokenizer for both"
            )
        if self.weights["logits"] > 0 and "ForSequenceClassification" in type(student).__name__:
            if s.num_labels != t.num_labels:
                raise ValueError(
                    f"student has {s.num_labels} labels and teacher {t.num_labels}: soft labels need the same "
                    "label set (or set logits_weight=0)"
                )
        if self.weights["attention"] > 0 and s.num_attention_heads != t.num_attention_heads:
            raise ValueError(
                f"attention maps cannot be matched: student has {s.num_attention_heads} heads, teacher "
                f"{t.num_attention_heads} (set attention_weight=0)"
            )

    def _mask_tokens(self, tokenizer, rate: float, vocab_size: int) -> tuple[Optional[int], torch.Tensor, int]:
        """What augmentation writes: the tokenizer's mask token id (``None`` without one, e.g. GPT-2's:
        random tokens instead), the special ids it leaves alone, and the vocabulary it draws from."""
        if not any(self.weights[t] > 0 for t in TEACHER_TERMS):
            raise ValueError("mask_augmentation distils the teacher on masked copies, but every teacher term has "
                             "weight 0; set mask_augmentation=0 or give a teacher term a weight")
        if tokenizer is None or not hasattr(tokenizer, "all_special_ids"):
            raise ValueError(f"mask_augmentation={rate} needs processing_class= the tokenizer (for its mask and "
                             "special tokens); pass it or set mask_augmentation=0")
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        return getattr(tokenizer, "mask_token_id", None), special, min(len(tokenizer), vocab_size)

    def _find_ffn(self, model: nn.Module, who: str) -> list[nn.Module]:
        modules = _ffn_modules(model)
        n = model.config.num_hidden_layers
        if len(modules) != n:
            raise ValueError(
                f"found {len(modules)} FFN blocks in the {who} ({type(model).__name__}) for {n} layers; "
                f"the ffn term knows the model types in kn_transformers.models.architectures.FFN_MODULES "
                f"({', '.join(sorted(FFN_MODULES))}); add an entry or set ffn_weight=0"
            )
        return modules

    @contextlib.contextmanager
    def _capture(self, student: nn.Module):
        """Hooks for one step: FFN outputs of both models, and (width mismatch) the student's
        projections, applied inside its forward because DDP requires parameters used there."""
        handles = []
        for who, modules in self._ffn_modules.items():
            store = self._ffn_outputs[who]
            store.clear()
            for module in modules:
                handles.append(module.register_forward_hook(
                    lambda _m, _i, out, store=store: store.append(out[0] if isinstance(out, tuple) else out)))
        self._projected = {}
        if hasattr(student, PROJECTIONS_ATTR):
            handles.append(student.register_forward_hook(self._project_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _project_hook(self, module: nn.Module, _args, output) -> None:
        """Forward hook on the student: project its states to the teacher's width."""
        projections = getattr(module, PROJECTIONS_ATTR)
        hidden = getattr(output, "hidden_states", None)
        ffn = [None] + self._ffn_outputs["student"]  # index = layer number
        out = {}
        if hidden is not None and "embedding" in projections:
            out["embedding"] = {0: projections["embedding"](hidden[0])}
        if hidden is not None and "hidden" in projections:
            out["hidden"] = {s: projections["hidden"](hidden[s]) for s, _ in self.layer_pairs}
        if len(ffn) > 1 and "ffn" in projections:
            out["ffn"] = {s: projections["ffn"](ffn[s]) for s, _ in self.layer_pairs}
        self._projected = out

    def _student_state(self, term: str, index: int, states) -> torch.Tensor:
        """The student's state ``index`` for ``term``, projected to the teacher's width if needed."""
        projected = self._projected.get(term)
        return projected[index] if projected is not None else states[index]

    # -- the loss -------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, s_out = self._terms(model, inputs)
        if not terms:
            raise ValueError("every distillation term has weight 0 (or no labels were given for the labels term)")
        mode = "train" if model.training else "eval"
        loss = self._weighted_sum(terms, inputs, mode, "loss_")
        if model.training and self.args.mask_augmentation > 0:
            # the teacher on a masked copy: its outputs there are targets that labels cannot give
            masked = self._masked_copy(inputs)
            aug_terms, _ = self._terms(model, masked)
            if aug_terms:
                loss = loss + self._weighted_sum(aug_terms, masked, mode, "loss_augmented_")
        if return_outputs:
            # only what predictions need: hidden states and attentions would balloon eval memory
            keep = ("logits",) if "logits" in s_out else ("start_logits", "end_logits")
            return loss, {k: s_out[k] for k in keep if k in s_out}
        return loss

    def _terms(self, model, inputs) -> tuple[dict, object]:
        """Each used term (unweighted) for one batch, and the student's outputs."""
        w = self.weights
        need_hidden = w["embedding"] > 0 or w["hidden"] > 0
        need_attention = w["attention"] > 0
        flags = dict(output_hidden_states=need_hidden, output_attentions=need_attention, return_dict=True)
        with self._capture(self.accelerator.unwrap_model(model)):
            s_out = model(**inputs, **flags)
            with torch.no_grad():
                t_out = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}, **flags)

        token_mask = inputs.get("attention_mask")
        norm = self.args.feature_normalization == "teacher"
        reduce = self._reduce_layers
        terms = {}
        if w["embedding"] > 0:
            terms["embedding"] = hidden_mse(
                self._student_state("embedding", 0, s_out.hidden_states), t_out.hidden_states[0], token_mask, norm
            )
        if w["hidden"] > 0:
            terms["hidden"] = reduce([
                hidden_mse(self._student_state("hidden", s, s_out.hidden_states), t_out.hidden_states[t], token_mask,
                           norm)
                for s, t in self.layer_pairs
            ])
        if need_attention:
            scores = s_out.attentions[0]
            valid = attention_valid_mask(token_mask, scores.shape[-1], self.causal, scores.device)
            fn = attention_kl if self.args.attention_loss == "kl" else attention_score_mse
            terms["attention"] = reduce([fn(s_out.attentions[s - 1], t_out.attentions[t - 1], valid)
                                         for s, t in self.layer_pairs])
        if w["ffn"] > 0:
            s_ffn, t_ffn = [None] + self._ffn_outputs["student"], self._ffn_outputs["teacher"]
            terms["ffn"] = reduce([
                hidden_mse(self._student_state("ffn", s, s_ffn), t_ffn[t - 1], token_mask, norm)
                for s, t in self.layer_pairs
            ])
        if w["logits"] > 0 and ("logits" in s_out or "start_logits" in s_out):  # base models have none
            terms["logits"] = self._logits_term(s_out, t_out, token_mask)
        if w["labels"] > 0 and getattr(s_out, "loss", None) is not None:
            terms["labels"] = s_out.loss
        return terms, s_out

    def _weighted_sum(self, terms: dict, inputs: dict, mode: str, prefix: str) -> torch.Tensor:
        """``Σ weight · schedule · term``, after the finiteness check; logs each term as ``prefix + name``."""
        device = next(iter(terms.values())).device
        stacked = torch.stack([v.detach().float().to(device) for v in terms.values()])
        values = dict(zip(terms, stacked.tolist()))  # one device sync for the check and the logs
        if not all(map(math.isfinite, values.values())):
            self._check_finite(terms, values, inputs, mode)
        scale, task_scale = self._term_scales(terms)
        for name, value in values.items():
            self._metrics[mode][prefix + name].append(value)
        return sum(self.weights[name] * (scale if name in INTERMEDIATE_TERMS else task_scale) * value
                   for name, value in terms.items())

    def _masked_copy(self, inputs: dict) -> dict:
        """``inputs`` without labels, each real non-special token replaced with probability
        ``mask_augmentation`` by the mask token (by a random non-special token where the tokenizer
        has none). Draws from torch's global generator, which the Trainer seeds."""
        ids = inputs["input_ids"]
        special = self._special_ids.to(ids.device)
        keep = torch.isin(ids, special)
        if inputs.get("attention_mask") is not None:
            keep |= ~inputs["attention_mask"].bool()
        hit = (torch.rand(ids.shape, device=ids.device) < self.args.mask_augmentation) & ~keep
        if self._mask_id is not None:
            new_ids = ids.masked_fill(hit, self._mask_id)
        else:
            drawn = torch.randint(0, self._vocab, ids.shape, device=ids.device)
            new_ids = torch.where(hit & ~torch.isin(drawn, special), drawn, ids)
        masked = {k: v for k, v in inputs.items() if k != "labels"}
        masked["input_ids"] = new_ids
        return masked

    def _check_finite(self, terms: dict, values: dict, inputs: dict, mode: str) -> None:
        """Drop a NaN ``labels`` term of a batch without a single label (e.g. an MLM batch with
        nothing masked: zero gradients); any other non-finite term stops with ``FloatingPointError``."""
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        labels = inputs.get("labels")
        if bad == ["labels"] and labels is not None:
            counted = labels[..., 1:] if self.causal else labels  # causal LMs shift the labels
            if not (counted != -100).any():
                terms["labels"] = terms["labels"].nan_to_num(0.0)  # zero, and not logged
                del values["labels"]
                return
        first = bad[0]
        others = f" (also non-finite: {', '.join(map(repr, bad[1:]))})" if len(bad) > 1 else ""
        where = f"at step {self.state.global_step + 1}" if mode == "train" else "during evaluation"
        raise FloatingPointError(
            f"ILKD loss term {first!r} is {values[first]} {where}{others}; the student or the teacher produced "
            "non-finite values: check the teacher's weights, lower the learning rate, or use fp32/bf16 instead of fp16"
        )

    def _reduce_layers(self, values: list) -> torch.Tensor:
        """A layer term over the mapped layers: their sum (the papers) or mean (``layer_reduction``)."""
        total = sum(values)
        return total / len(values) if self.args.layer_reduction == "mean" else total

    def _term_scales(self, terms: dict) -> tuple[float, float]:
        """Factors on the intermediate and on the task terms' weights this step.

        ``constant``: 1 and 1. ``linear_decay``: ``1 - step / max_steps`` and 1. ``two_phase``
        (TinyBERT's intermediate-then-prediction distillation in one run): the intermediate terms
        alone for the first half of training, then the task terms alone. Without task terms in the
        loss (stage 1 on text) the intermediate terms are the objective and keep their weights.
        """
        schedule = self.args.intermediate_schedule
        if schedule == "constant" or not any(t in terms for t in ("logits", "labels")):
            return 1.0, 1.0
        total = self.state.max_steps or 0
        progress = self.state.global_step / total if total > 0 else 0.0
        if schedule == "linear_decay":
            return max(0.0, 1.0 - progress), 1.0
        return (1.0, 0.0) if progress < 0.5 else (0.0, 1.0)

    def _logits_term(self, s_out, t_out, token_mask) -> torch.Tensor:
        T = self.args.temperature
        if "logits" not in s_out:  # question answering: start and end distributions
            return sum(logits_kl(s_out[k], t_out[k], T) for k in ("start_logits", "end_logits")) / 2
        s, t = s_out.logits, t_out.logits
        if self.regression:
            return logits_mse(s, t)
        return logits_kl(s, t, T, mask=token_mask if s.dim() == 3 else None)

    # -- logging and saving ---------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss")), None)
        mode = "eval" if prefix is not None else "train"
        means = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if means and self.args.world_size > 1:
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], device=self.args.device)
            means = dict(zip(keys, self.accelerator.gather(t[None]).mean(0).tolist()))
        logs.update({f"{prefix or ''}{k}": v for k, v in means.items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the projections inside the student (for resume); a final save
        writes the student alone, loadable by ``from_pretrained``, and the projections beside it."""
        model = self.accelerator.unwrap_model(self.model)
        projections = getattr(model, PROJECTIONS_ATTR, None)
        if _internal_call or projections is None:
            return super().save_model(output_dir, _internal_call)
        del model._modules[PROJECTIONS_ATTR]
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            model.add_module(PROJECTIONS_ATTR, projections)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_file({k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()},
                      os.path.join(output_dir, PROJECTIONS_FILE))


def load_projections(model: nn.Module, folder: str) -> None:
    """Restore projections written by a final ``ILKDTrainer.save_model`` onto ``model.ilkd_projections``."""
    projections = getattr(model, PROJECTIONS_ATTR)
    projections.load_state_dict(load_file(os.path.join(folder, PROJECTIONS_FILE)))
