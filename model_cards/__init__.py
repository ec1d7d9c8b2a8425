"""Model card templates (installed as ``kn_transformers.model_cards``)."""
