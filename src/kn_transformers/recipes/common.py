"""What every recipe does the same way: argument parsing, loading the tokenizer, and the final
card + Hub push."""

from __future__ import annotations

import os
import sys

from transformers import AutoTokenizer, HfArgumentParser

from ..hub import push_folder_to_hub
from ..models.loading import check_model_name_or_path


def parse_args(types, argv=None):
    """``HfArgumentParser`` over ``types``, from flags or from one ``.json`` file."""
    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(argv)


def load_tokenizer(tokenizer_name, model_name_or_path, model_role: str = "model"):
    """``--tokenizer_name`` if given, else the tokenizer of ``model_name_or_path`` (the ``model_role``
    named in the error when that folder does not exist)."""
    what = "tokenizer" if tokenizer_name else model_role
    return AutoTokenizer.from_pretrained(check_model_name_or_path(tokenizer_name or model_name_or_path, what))


def save_card_and_push(card, training_args, push: bool) -> None:
    """Write ``card`` as the output folder's README.md; upload the folder if ``push``."""
    card.save(os.path.join(training_args.output_dir, "README.md"))
    if push:
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
        push_folder_to_hub(training_args.output_dir, repo_id, token=training_args.hub_token,
                           private=training_args.hub_private_repo)
