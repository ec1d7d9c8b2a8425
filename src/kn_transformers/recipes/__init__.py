"""End-to-end recipes (``HfArgumentParser`` scripts); ``training/*.py`` and the CLI call their ``main``."""
