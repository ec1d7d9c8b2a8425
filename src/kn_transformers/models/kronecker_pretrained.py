"""What the Kronecker model classes add to ``PreTrainedModel``: strict loading and self-contained saving.

- **Strict loading.** transformers only warns about missing and unexpected keys and initialises
  the missing ones at random: a ``config.json`` whose ``kronecker_factors`` was edited (or
  dropped) would load another model silently. Factors in the checkpoint that the config does not
  list, or a dense weight where the config lists factors, are errors; factors simply absent (a
  partial checkpoint) are initialised by ``_init_weights`` as transformers does for any missing key.
- **Saving the code.** ``save_pretrained`` writes ``auto_map`` (every Auto class of the family)
  and, next to the weights, the model's source and every package module it imports, flat, with
  their relative imports rewritten to the flat folder (``from ..core.dispatch import x`` →
  ``from .dispatch import x``). transformers' own ``register_for_auto_class`` copies only
  single-dot imports of the model file's own folder, which would force every module the models
  use into one folder. Loading with ``trust_remote_code=True`` then needs only torch and
  transformers.

It travels with the saved code itself (it is a base class of the models).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys

from ..core.dispatch import TiedKroneckerHead

__all__ = ["KroneckerPreTrainedMixin", "model_code_files"]

_FACTORS = ("A", "B")
# `from .x import`, `from ..pkg.x import` at any indentation (imports inside functions too)
_RELATIVE_FROM = re.compile(r"^(\s*from\s+)(\.+[\w.]*)(\s+import\b)", re.MULTILINE)


def _factor_keys(keys) -> list:
    return sorted(k for k in keys or () if k.rsplit(".", 1)[-1] in _FACTORS)


def model_code_files(*module_names: str) -> dict[str, str]:
    """``{file name: source}`` of the modules named and every module they import relatively,
    flattened: each becomes ``<its file name>`` with relative imports rewritten to ``from .<name>``.

    ``ValueError`` when a relative import names a package (import its module instead) or two
    modules of the closure share a file name.
    """
    files: dict[str, str] = {}
    owners: dict[str, str] = {}
    todo = list(module_names)
    while todo:
        name = todo.pop()
        module = sys.modules.get(name) or importlib.import_module(name)
        path = module.__file__
        flat = os.path.basename(path)
        if flat == "__init__.py":
            raise ValueError(f"saved model code imports the package {name!r}; import one of its modules instead")
        if flat in owners:
            if owners[flat] != name:
                raise ValueError(f"saved model code has two modules named {flat}: {owners[flat]} and {name}")
            continue
        owners[flat] = name

        def flatten(match, package=module.__package__):
            target = importlib.util.resolve_name(match.group(2), package)
            todo.append(target)
            return f"{match.group(1)}.{target.rsplit('.', 1)[-1]}{match.group(3)}"

        with open(path, encoding="utf-8") as f:
            files[flat] = _RELATIVE_FROM.sub(flatten, f.read())
    return files


class KroneckerPreTrainedMixin:
    """Mixed in before a transformers ``*PreTrainedModel`` by the Kronecker model classes.

    ``_auto_classes``: ``{"AutoModel": "KnGPT2Model", ...}``, the family's classes by Auto class,
    all written to ``auto_map`` whichever class is saved.
    """

    _auto_classes: dict = {}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that raises when the checkpoint's factors and the config disagree."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        unexpected = _factor_keys(info.get("unexpected_keys"))
        dense = set(info.get("unexpected_keys") or ())
        # a listed Kronecker module whose checkpoint entry is a dense matrix (not merely absent)
        missing = [k for k in _factor_keys(info.get("missing_keys")) if k.rsplit(".", 1)[0] + ".weight" in dense]
        if unexpected or missing:
            what = (f"factors the config does not list ({', '.join(unexpected[:4])}{'…' if len(unexpected) > 4 else ''})"
                    if unexpected else f"no factors for modules the config lists ({', '.join(missing[:4])}"
                                       f"{'…' if len(missing) > 4 else ''})")
            raise ValueError(f"the checkpoint has {what}: config.json's kronecker_factors and the weights disagree; "
                             "restore the config saved with the weights")
        return (model, info) if want_info else model

    def tie_weights(self, *args, **kwargs):
        """transformers' tying, and a factored head (:class:`TiedKroneckerHead`) re-pointed at the
        current input embedding, which a conversion or ``set_input_embeddings`` may have replaced."""
        result = super().tie_weights(*args, **kwargs)
        embedding = self.get_input_embeddings()
        for module in self.modules():
            if isinstance(module, TiedKroneckerHead) and module.embedding is not embedding:
                module.tie_to(embedding)
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus ``auto_map`` and the model's code (see the module docstring)."""
        config_cls, model_module = type(self.config), type(self).__module__
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoConfig"] = f"{config_cls.__module__.rsplit('.', 1)[-1]}.{config_cls.__name__}"
        auto_map.update({auto: f"{model_module.rsplit('.', 1)[-1]}.{name}" for auto, name in self._auto_classes.items()})
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name, source in model_code_files(model_module, config_cls.__module__).items():
                with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
                    f.write(source)
        return result
