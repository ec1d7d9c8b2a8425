"""Checking user-given model names and paths before ``from_pretrained`` sees them."""

from __future__ import annotations

import os

from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["check_model_name_or_path"]


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
