#!/usr/bin/env python
"""See `kn_transformers.recipes.evaluate_perplexity` (also `kn-transformers` CLI). Run with --help for the arguments."""

from kn_transformers.recipes.evaluate_perplexity import main

if __name__ == "__main__":
    main()
