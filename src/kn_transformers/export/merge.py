"""``merge_to_dense``: a Kronecker model back to its vanilla transformers architecture.

Toolchains that only know dense architectures (llama.cpp, TensorRT-LLM, vLLM, Optimum) need
the plain model: every Kronecker matrix becomes ``W = Σ_r A_r ⊗ B_r`` in the module the dense
architecture has at that name (``nn.Linear``, GPT-2's ``Conv1D`` stored in × out, or
``nn.Embedding``); every other parameter and buffer is copied; heads tied to the embedding are
re-tied by the dense model itself. The result has no Kronecker field in its config and loads
wherever transformers does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from ..core.config import is_kroneckerized
from ..core.layers import KroneckerEmbedding, KroneckerLinear

__all__ = ["merge_to_dense", "dense_class_of"]

# config fields that only Kronecker configs carry (the rest of the config is the architecture's)
_KRONECKER_CONFIG_FIELDS = ("kronecker_factors", "kronecker_normalize", "kronecker_preset", "auto_map")


def dense_class_of(model: nn.Module) -> type[PreTrainedModel]:
    """The transformers class a Kronecker model class is built on (``KnGPT2LMHeadModel`` →
    ``GPT2LMHeadModel``): the first class of its MRO that transformers itself defines."""
    for cls in type(model).__mro__[1:]:
        if (issubclass(cls, PreTrainedModel) and cls.__module__.startswith("transformers.models.")
                and not cls.__name__.endswith("PreTrainedModel")):
            return cls
    raise TypeError(
        f"merge_to_dense expects a Kronecker transformers model (KnGPT2*, KroneckerBert*), got "
        f"{type(model).__name__}; for a single layer use KroneckerLinear.to_dense()"
    )


def _dense_config(model: PreTrainedModel, dense_cls: type[PreTrainedModel]):
    config_cls = dense_cls.config_class
    values = model.config.to_dict()
    for key in (*_KRONECKER_CONFIG_FIELDS, "model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    config = config_cls(**values)
    config.architectures = [dense_cls.__name__]
    # the attention implementation that returns pre-softmax scores is this library's: use eager's
    if getattr(model.config, "_attn_implementation", None) == "kn_eager_scores":
        config._attn_implementation = "eager"
    else:
        config._attn_implementation = getattr(model.config, "_attn_implementation", None)
    return config


def _merged_state_dict(model: nn.Module, dense: nn.Module) -> dict[str, torch.Tensor]:
    """(Called under ``no_grad``.) The dense model's state dict computed from ``model``: Kronecker modules as dense weights
    in the layout of the dense module at the same name, everything else as is."""
    state = {}
    kronecker_names = set()
    for name, module in model.named_modules():
        if not isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            continue
        kronecker_names.add(name)
        weight = module.weight.detach()  # (out, in) / (vocab, dim), padded rows dropped
        target = dense.get_submodule(name)
        if isinstance(module, KroneckerLinear) and type(target).__name__ == "Conv1D":
            weight = weight.T  # Conv1D stores in × out
        if tuple(target.weight.shape) != tuple(weight.shape):
            raise ValueError(
                f"merge_to_dense: {name} merges to {tuple(weight.shape)} but the dense architecture has "
                f"{type(target).__name__} {tuple(target.weight.shape)} there"
            )
        state[f"{name}.weight"] = weight.contiguous()
        if isinstance(module, KroneckerLinear) and module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] in kronecker_names:
            continue  # A, B (and bias, taken above)
        state[key] = value.detach()
    return state


@torch.no_grad()
def merge_to_dense(model: PreTrainedModel) -> PreTrainedModel:
    """The vanilla transformers model computing what ``model`` computes, with dense weights.

    ``model``: a KnGPT2 or KroneckerBERT model (any head, optimised with
    ``optimize_for_inference`` or not), or any model ``kroneckerize`` made (its own class without
    the ``quantization_config``). Returns e.g. a ``GPT2LMHeadModel``, a ``LlamaForCausalLM`` or a
    ``BertForSequenceClassification`` on ``model``'s device and dtype, in eval mode if ``model``
    is, whose config has no Kronecker field: ``save_pretrained`` writes a folder that loads
    without ``kn_transformers``. A head tied to a Kronecker embedding (logits computed factored)
    becomes the dense tied head; an untied dense head stays untied. ``model`` is not changed.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"merge_to_dense expects a transformers PreTrainedModel, got {type(model).__name__}")
    if is_kroneckerized(model):  # kroneckerize's output: the architecture's own class, minus the quantization entry
        dense_cls = type(model)
        config = copy.deepcopy(model.config)
        del config.quantization_config
        if getattr(config, "_attn_implementation", None) == "kn_eager_scores":
            config._attn_implementation = "eager"
    else:
        dense_cls = dense_class_of(model)
        config = _dense_config(model, dense_cls)
    param = next(model.parameters())
    with no_init_weights(), torch.device(param.device):
        dense = dense_cls(config)  # real buffers (position ids, masks); weights come from ``model``
    dense.to(dtype=param.dtype)  # before loading: copying into float32 parameters would round float64 ones
    state = _merged_state_dict(model, dense)
    result = dense.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"merge_to_dense: {dense_cls.__name__} has no parameter {result.unexpected_keys[0]!r}")
    dense.tie_weights()
    # a tied alias (lm_head.weight) is missing from ``state`` by design; named_parameters lists
    # only the tensor's first name, so a missing key among those is a weight nothing provided
    owners = {n for n, _ in dense.named_parameters()}
    untouched = [k for k in result.missing_keys if k in owners and k not in state]
    if untouched:
        raise ValueError(f"merge_to_dense: {type(model).__name__} has no value for {untouched[0]!r}")
    dense.train(model.training)
    return dense
