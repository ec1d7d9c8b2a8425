"""Checking user-given model names and paths before ``from_pretrained`` sees them, and the one
teacher loader of the converters."""

from __future__ import annotations

import os
from typing import Callable

from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["check_model_name_or_path", "load_teacher"]


def _looks_local(path: str) -> bool:
    """A path, not a Hub id: ``./x``, ``~/x``, ``/x``, ``a/b/c``, ``a\\b``, or ``a/b`` with an existing ``a/``."""
    if path.startswith((".", "~", "/", os.sep)) or os.path.isabs(path):
        return True
    if any(sep in path for sep in {os.sep, os.altsep} - {"/", None}) or path.count("/") > 1:
        return True  # a Hub id is "name" or "namespace/name"
    parent = os.path.dirname(path)
    if parent and os.path.isdir(parent):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def check_model_name_or_path(name_or_path, what: str = "model") -> str:
    """``name_or_path`` as a ``str``; ``FileNotFoundError`` when it looks like a local folder that does not exist.

    Without this, ``from_pretrained`` treats a mistyped path as a Hub id and fails with
    huggingface_hub's "Repo id must be in the form ..." message. Hub ids pass through unchanged.
    """
    path = os.fsdecode(name_or_path)
    if not os.path.exists(path) and _looks_local(path):
        raise FileNotFoundError(
            f"{what} {path!r}: the folder does not exist; pass a local model folder (saved with save_pretrained) "
            "or a Hub id such as 'openai-community/gpt2'"
        )
    return path


def load_teacher(teacher, check_config: Callable, choose_class: Callable):
    """A loaded teacher from a Hub id, a folder or a model (returned as is).

    ``check_config(config, what)`` raises the converter's one-line error for a config it cannot
    convert (``what`` names the source); ``choose_class(config)`` is the class a name or folder loads
    with (from its ``config.architectures``). Offline: set ``HF_HUB_OFFLINE=1``.
    """
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
        source = check_model_name_or_path(teacher, "teacher")
        config = AutoConfig.from_pretrained(source)
        check_config(config, repr(source))
        return choose_class(config).from_pretrained(source, config=config)
    if isinstance(teacher, PreTrainedModel):
        check_config(teacher.config, f"a {type(teacher).__name__}")
        return teacher
    raise ValueError(f"teacher must be a model name, a local folder or a loaded transformers model, got "
                     f"{type(teacher).__name__}")
