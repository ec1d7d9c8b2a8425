"""Sliding-window perplexity of any causal LM (dense GPT-2 or KnGPT2) on a text file or Hub data set.

    python training/evaluate_perplexity.py --model_name_or_path out/kngpt2 --text_file heldout.txt --stride 512
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import HfArgumentParser

from .perplexity import sliding_window_perplexity
from .common import load_tokenizer
from .students import load_model


@dataclass
class PerplexityArguments:
    model_name_or_path: str = field(metadata={"help": "causal LM folder or Hub id"})
    text_file: Optional[str] = field(default=None)
    dataset_name: Optional[str] = field(default=None, metadata={"help": "e.g. wikitext"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "e.g. wikitext-2-raw-v1"})
    split: str = field(default="test")
    tokenizer_name: Optional[str] = field(default=None)
    max_length: Optional[int] = field(default=None, metadata={"help": "window; default: the model's context"})
    stride: Optional[int] = field(default=None, metadata={"help": "default: max_length // 2"})
    batch_size: int = field(default=8)
    max_tokens: Optional[int] = field(default=None, metadata={"help": "evaluate only the first N tokens"})
    output_file: Optional[str] = field(default=None, metadata={"help": "write the result as JSON"})


def main(argv=None) -> dict:
    parser = HfArgumentParser(PerplexityArguments)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    elif args.dataset_name:
        from datasets import load_dataset

        text = "\n\n".join(load_dataset(args.dataset_name, args.dataset_config_name, split=args.split)["text"])
    else:
        raise ValueError("give --text_file or --dataset_name")
    tokenizer = load_tokenizer(args.tokenizer_name, args.model_name_or_path)
    model = load_model(args.model_name_or_path, "causal-lm")
    ids = torch.tensor(tokenizer(text)["input_ids"])
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    max_length = args.max_length or model.config.n_positions
    result = sliding_window_perplexity(model, ids, max_length=max_length, stride=args.stride or max_length // 2,
                                       batch_size=args.batch_size)
    result.update(model=args.model_name_or_path, max_length=max_length, stride=args.stride or max_length // 2)
    print(json.dumps(result, indent=2))
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
