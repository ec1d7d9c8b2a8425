"""Loading compressed models of any architecture with ``AutoModelFor<Task>.from_pretrained``.

A compressed model's ``config.json`` is its base architecture's (``model_type: "llama"``…) plus a
``quantization_config`` entry with ``quant_method: "kn-transformers"`` (the resolved
:class:`KroneckerConfig`). transformers routes such entries to the quantizer registered for the
method — the plugin API through which GPTQ/AWQ/HQQ checkpoints load, whatever their architecture.
Importing ``kn_transformers`` registers this one; before the weights load it swaps each listed
module of the freshly built (meta-device) model for an empty Kronecker layer of the saved shape,
so ``dtype=``, ``device_map=`` and low-memory loading are transformers' own.

Why this and not a model class per architecture: one code path serves every architecture
transformers knows, the folder stays a standard one (tokenizer, generation config, the base
model's ``model_type``), and the paper models keep their own classes for ``trust_remote_code``.
"""

from __future__ import annotations

import json

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer

from .factor_spec import factor_split
from .config import QUANT_METHOD, KroneckerConfig
from .dispatch import dispatch_for, replace_module
from .kroneckerize import attach_tied_head, disable_tying

__all__ = ["KroneckerHfQuantizer", "build_kronecker_modules"]


def build_kronecker_modules(model: torch.nn.Module, config: KroneckerConfig) -> None:
    """Swap each module in ``config.modules`` for an empty Kronecker layer of its saved shape
    (``ValueError`` naming the module when the model's module has another shape or type)."""
    embeddings = {}
    for name, spec in config.modules.items():
        if spec["kind"] == "tied_head":
            continue
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config.modules names {name!r}, which {type(model).__name__} does not "
                             "have; the config does not belong to this model") from None
        entry = dispatch_for(dense)
        if entry is None or entry.kind != spec["kind"]:
            raise ValueError(f"quantization_config.modules[{name!r}] is a Kronecker {spec['kind']}, but the model's "
                             f"module there is a {type(dense).__name__}")
        shape = list(entry.shape(dense))
        if shape != spec["shape"]:
            raise ValueError(f"quantization_config.modules[{name!r}] has shape {spec['shape']}, the model's module "
                             f"{shape}; the config does not belong to this model")
        factor_split(shape, spec["a_shape"], spec["rank"], spec["kind"], f"quantization_config.modules[{name!r}]")
        layer = entry.build(dense, tuple(spec["a_shape"]), spec["rank"])
        replace_module(model, name, layer)
        embeddings[name] = layer
    for name, spec in config.modules.items():
        if spec["kind"] == "tied_head":
            source = next((e for e in embeddings.values() if hasattr(e, "logits")), None)
            if source is None:
                raise ValueError(f"quantization_config.modules[{name!r}] is a tied head, but no Kronecker embedding is listed")
            head = model.get_submodule(name)
            bias = getattr(head, "bias", None)
            attach_tied_head(model, name, source, None if bias is None else torch.nn.Parameter(torch.empty_like(bias)))
    if not any(spec["kind"] == "tied_head" for spec in config.modules.values()) and any(
            spec["kind"] == "embedding" for spec in config.modules.values()):
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(text_config, "tie_word_embeddings", False):
            disable_tying(model)  # an untied dense head beside a Kronecker embedding


def _checkpoint_shapes(checkpoint_files) -> dict[str, list[int]]:
    """``{key: shape}`` from the safetensors headers (no tensor read)."""
    shapes = {}
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            continue
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _check_against_checkpoint(model, config: KroneckerConfig, checkpoint_files) -> None:
    """The saved factors must be what the config says: a hand-edited config must not load another model."""
    shapes = _checkpoint_shapes(checkpoint_files)
    if not shapes:
        return
    keys = {k for k in shapes}

    def find(name: str, leaf: str):
        for key in (f"{name}.{leaf}",) + tuple(k for k in keys if k.endswith(f".{name}.{leaf}") or
                                               f"{name}.{leaf}".endswith("." + k)):
            if key in shapes:
                return key
        return None

    for name, spec in config.modules.items():
        if spec["kind"] == "tied_head":
            continue
        m1, n1 = spec["a_shape"]
        out_f, in_f = spec["shape"]
        m2 = -(-out_f // m1) if spec["kind"] == "embedding" else out_f // m1
        want = {"A": [spec["rank"], m1, n1], "B": [spec["rank"], m2, in_f // n1]}
        for leaf, shape in want.items():
            key = find(name, leaf)
            if key is None:
                dense = find(name, "weight")
                raise ValueError(f"config.json lists {name!r} as Kronecker but the checkpoint has "
                                 f"{'a dense weight' if dense else 'no factors'} for it; the config and weights disagree")
            if list(shapes[key]) != shape:
                raise ValueError(f"config.json says {name}.{leaf} is {shape}, the checkpoint has {list(shapes[key])}; "
                                 "the config and weights disagree")
    listed = set(config.modules)
    for key in keys:
        if key.endswith(".A") and key[:-2] + ".B" in keys:
            name = key[:-2]
            if not any(name == m or name.endswith("." + m) or m.endswith("." + name) for m in listed):
                raise ValueError(f"the checkpoint has Kronecker factors for {name!r}, which config.json's "
                                 "quantization_config.modules does not list; the config and weights disagree")


@register_quantization_config(QUANT_METHOD)
class _RegisteredKroneckerConfig(KroneckerConfig):
    """:class:`KroneckerConfig` under transformers' registry (same fields; ``from_dict`` returns the base class)."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        return KroneckerConfig.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


@register_quantizer(QUANT_METHOD)
class KroneckerHfQuantizer(HfQuantizer):
    """Rebuilds the Kronecker layers of a saved compressed model before its weights load."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = KroneckerConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("from_pretrained(..., quantization_config=KroneckerConfig(...)) does not compress on load; "
                             "load the dense model, then call kn_transformers.kroneckerize(model, config)")
        if not self.quantization_config.modules:
            raise ValueError("quantization_config (kronecker) lists no modules; save the model kroneckerize returned")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        build_kronecker_modules(model, self.quantization_config)
        _check_against_checkpoint(model, self.quantization_config, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.compression_report = None
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

