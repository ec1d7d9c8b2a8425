#!/usr/bin/env python
"""See `kn_transformers.recipes.distill_lm` (also `kn-transformers` CLI). Run with --help for the arguments."""

from kn_transformers.recipes.distill_lm import main

if __name__ == "__main__":
    main()
