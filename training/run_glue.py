#!/usr/bin/env python
"""See `kn_transformers.recipes.run_glue` (also `kn-transformers` CLI). Run with --help for the arguments."""

from kn_transformers.recipes.run_glue import main

if __name__ == "__main__":
    main()
