"""Tiny random configurations of the architectures the Kronecker core is tested on (no download).

Every width is even, so that ``a_shape=(2, 2)`` at rank 4 (the rank of the rearranged matrix)
represents every weight exactly.
"""

from transformers import (
    BertConfig,
    DistilBertConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    RobertaConfig,
)

_DECODER = dict(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: name -> (config, Auto class name, causal)
ARCHITECTURES = {
    "llama": (LlamaConfig(**_DECODER, num_key_value_heads=2), "AutoModelForCausalLM", True),
    "qwen2": (Qwen2Config(**_DECODER, num_key_value_heads=2), "AutoModelForCausalLM", True),
    "mistral": (MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=None), "AutoModelForCausalLM", True),
    "phi3": (Phi3Config(**_DECODER, num_key_value_heads=2), "AutoModelForCausalLM", True),
    "gemma": (GemmaConfig(**_DECODER, num_key_value_heads=2, head_dim=8), "AutoModelForCausalLM", True),
    "opt": (OPTConfig(vocab_size=98, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2), "AutoModelForCausalLM", True),
    "gpt_neox": (GPTNeoXConfig(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2), "AutoModelForCausalLM", True),
    "gpt2": (GPT2Config(vocab_size=98, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2), "AutoModelForCausalLM", True),
    "roberta": (RobertaConfig(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, pad_token_id=1),
                "AutoModelForMaskedLM", False),
    "distilbert": (DistilBertConfig(vocab_size=98, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                    max_position_embeddings=64, pad_token_id=0), "AutoModelForMaskedLM", False),
    "bert": (BertConfig(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64), "AutoModelForSequenceClassification",
             False),
}
