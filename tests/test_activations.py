"""In-place inference activations: same values as transformers' ACT2FN, never overwriting a
tensor someone else can still see."""

import pytest
import torch
from transformers import BertConfig, GPT2Config
from transformers.activations import ACT2FN

from kn_transformers import (
    KnGPT2LMHeadModel,
    KroneckerBertModel,
    kngpt2_config_from_gpt2,
    kronecker_bert_config,
)
from kn_transformers.models.activations import INPLACE_ACTIVATIONS


@pytest.mark.parametrize("name", sorted(INPLACE_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_twin_is_bit_identical(name, dtype):
    torch.manual_seed(0)
    x = torch.randn(7, 33, dtype=dtype) * 4
    expected = ACT2FN[name](x)
    y = x.clone()
    out = INPLACE_ACTIVATIONS[name](y)
    assert out.data_ptr() == y.data_ptr()  # really in place
    assert torch.equal(out, expected)


def _models():
    torch.manual_seed(0)
    gpt2 = KnGPT2LMHeadModel(kngpt2_config_from_gpt2(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=16), preset="paper")).eval()
    bert = KroneckerBertModel(kronecker_bert_config(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   vocab_size=50, max_position_embeddings=16), "kroneckerbert8")).eval()
    return [(gpt2, gpt2.transformer.h[0].mlp.c_fc), (bert, bert.encoder.layer[0].intermediate.dense)]


@pytest.mark.parametrize("index", [0, 1])
def test_models_give_the_same_outputs_with_and_without_autograd(index):
    model, producer = _models()[index]
    ids = torch.randint(0, 50, (2, 9))
    with torch.enable_grad():
        ref = model(input_ids=ids)[0]
    with torch.no_grad():
        out = model(input_ids=ids)[0]
    assert torch.equal(out, ref)
    # a hook that keeps the projection's output sees it unchanged (no overwrite then)
    kept = []
    handle = producer.register_forward_hook(lambda m, i, o: kept.append((i[0], o)))
    with torch.no_grad():
        hooked = model(input_ids=ids)[0]
        x, o = kept[0]
        assert torch.equal(o, producer(x))
    handle.remove()
    assert torch.equal(hooked, ref)
