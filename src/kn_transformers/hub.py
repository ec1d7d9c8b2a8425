"""Pushing a saved student folder to the Hub, and checking that it is complete first."""

from __future__ import annotations

import json
import os
from typing import Optional

REQUIRED = ("config.json", "README.md")


def check_upload_folder(folder: str) -> list[str]:
    """The files that would be uploaded; raises ``ValueError`` naming what is missing.

    A complete student folder has weights (safetensors), ``config.json`` with an ``auto_map``
    for the Kronecker models, the Python files that map names (so that
    ``trust_remote_code=True`` loads it without kn-transformers), and the model card.
    """
    files = sorted(os.listdir(folder))
    missing = [f for f in REQUIRED if f not in files]
    if not any(f.endswith(".safetensors") for f in files):
        missing.append("*.safetensors weights")
    if "config.json" in files:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if config.get("model_type") in ("kngpt2", "kronecker-bert"):
            auto_map = config.get("auto_map") or {}
            if not auto_map:
                missing.append("auto_map in config.json")
            modules = {v.split(".")[0] for v in auto_map.values() if isinstance(v, str)}
            missing += [f"{m}.py" for m in sorted(modules) if f"{m}.py" not in files]
    if missing:
        raise ValueError(f"{folder} is not ready to upload: missing {', '.join(missing)}")
    return files


def push_folder_to_hub(folder: str, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                       commit_message: str = "Upload Kronecker student (kn-transformers)") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (checked by :func:`check_upload_folder`)."""
    from huggingface_hub import HfApi

    check_upload_folder(folder)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo.repo_id, commit_message=commit_message,
                      ignore_patterns=["checkpoint-*", "runs/*", "*.pt", "training_args.bin"])
    return repo.repo_id
