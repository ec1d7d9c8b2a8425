"""KnGPT2 (issue 3): config, model, conversion from GPT-2, generation, save/load, training.

All models are tiny GPT-2 configurations (n_embd 32-64, 2-4 layers) except the GPT-2 small
parameter count, which is built on the meta device.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    Trainer,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

from kn_transformers import (
    KnGPT2Config,
    KnGPT2ForSequenceClassification,
    KnGPT2LMHeadModel,
    KnGPT2Model,
    KroneckerEmbedding,
    KroneckerLinear,
    choose_kronecker_factors,
    kngpt2_config_from_gpt2,
    kngpt2_from_gpt2,
    kronecker_to_dense,
)
from kn_transformers.core.report import count_parameters
from kn_transformers.core import TiedKroneckerHead

LAYER_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
VOCAB = 96
SMALL = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)


def tiny_gpt2_config(**kw) -> GPT2Config:
    base = dict(**SMALL, n_positions=64)
    base.update(kw)
    return GPT2Config(**base)


def tiny_teacher(seed=0, dtype=torch.float32, scale=1.0, **kw) -> GPT2LMHeadModel:
    """A random GPT-2 in eval mode; ``scale`` > 1 spreads the logits (less tied argmaxes)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(**kw)).to(dtype).eval()
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" not in name and not name.startswith("transformer.ln_f"):
                    p.mul_(scale)
    return model


def full_rank_factors(config: GPT2Config, layers, a_shapes: dict, with_wte=True) -> dict:
    """A map whose rank is the full rank of every rearranged matrix: the factors are exact."""
    kcfg = KnGPT2Config(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    names = (["wte"] if with_wte else []) + [f"h.{i}.{m}" for i in layers for m in LAYER_MODULES]
    out = {}
    for name in names:
        m, n = kcfg.module_shape(name)
        m1, n1 = a_shapes[name.split(".", 2)[-1] if name != "wte" else "wte"]
        m2, n2 = -(-m // m1), n // n1
        out[name] = {"a_shape": [m1, n1], "rank": min(m1 * n1, m2 * n2)}
    return out


A_SHAPES = {"wte": (8, 4), "attn.c_attn": (8, 4), "attn.c_proj": (4, 4), "mlp.c_fc": (8, 4), "mlp.c_proj": (4, 8)}


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def test_config_json_round_trip_and_canonical_form(tmp_path):
    cfg = KnGPT2Config(
        **SMALL,
        kronecker_factors={"h.1.mlp.c_fc": {"a_shape": (8, 2)}, "wte": {"a_shape": [12, 16], "rank": 2}},
        tie_word_embeddings=False, kronecker_normalize=True,
    )
    # canonical: lists, explicit rank, wte first then layers in order
    assert list(cfg.kronecker_factors) == ["wte", "h.1.mlp.c_fc"]
    assert cfg.kronecker_factors["h.1.mlp.c_fc"] == {"a_shape": [8, 2], "rank": 1}
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "kngpt2" and saved["kronecker_factors"]["wte"] == {"a_shape": [12, 16], "rank": 2}
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is KnGPT2Config
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(cfg.to_dict())
    assert loaded.tie_word_embeddings is False and loaded.kronecker_normalize is True


@pytest.mark.parametrize(
    "factors,match",
    [
        ({"h.2.mlp.c_fc": {"a_shape": [8, 2]}}, r"kronecker_factors\['h\.2\.mlp\.c_fc'\]: layer index 2 is out of range"),
        ({"h.0.attn.q_proj": {"a_shape": [8, 2]}}, r"kronecker_factors\['h\.0\.attn\.q_proj'\]: unknown module name"),
        ({"lm_head": {"a_shape": [8, 2]}}, r"kronecker_factors\['lm_head'\]: unknown module name"),
        (
            {"h.0.attn.c_attn": {"a_shape": [5, 2]}},
            r"kronecker_factors\['h\.0\.attn\.c_attn'\]: a_shape \[5, 2\] does not divide .*\(96, 32\)",
        ),
        ({"wte": {"a_shape": [8, 5]}}, r"kronecker_factors\['wte'\]: a_shape \[8, 5\] does not fit"),
        ({"h.0.mlp.c_proj": {"a_shape": [4, 8], "rank": 33}}, r"kronecker_factors\['h\.0\.mlp\.c_proj'\]: rank 33 is not possible"),
        ({"h.0.mlp.c_proj": {"shape": [4, 8]}}, r"kronecker_factors\['h\.0\.mlp\.c_proj'\] must be a dict"),
    ],
)
def test_config_rejects_invalid_maps_naming_the_field(factors, match):
    with pytest.raises(ValueError, match=match):
        KnGPT2Config(**SMALL, kronecker_factors=factors)


def test_model_modules_follow_the_config():
    factors = {"wte": {"a_shape": [12, 16]}, "h.1.attn.c_attn": {"a_shape": [8, 4], "rank": 2}}
    cfg = KnGPT2Config(**SMALL, kronecker_factors=factors)
    model = KnGPT2Model(cfg)
    assert isinstance(model.wte, KroneckerEmbedding) and model.wte.a_shape == (12, 16)
    c_attn = model.h[1].attn.c_attn
    assert isinstance(c_attn, KroneckerLinear) and (c_attn.in_features, c_attn.out_features, c_attn.rank) == (32, 96, 2)
    assert isinstance(model.h[0].attn.c_attn, Conv1D) and isinstance(model.h[1].mlp.c_fc, Conv1D)
    # the random init gives the product GPT-2's entry std (0.02), within sampling noise
    big = KnGPT2Model(KnGPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB, eos_token_id=1, bos_token_id=0,
                                   kronecker_factors={"h.0.mlp.c_fc": {"a_shape": [16, 8]}}))
    assert isinstance(big.h[0].mlp.c_fc, KroneckerLinear)
    std = big.h[0].mlp.c_fc.A.std().item()
    assert abs(std - math.sqrt(0.02)) < 0.2 * math.sqrt(0.02)


# ----------------------------------------------------------------------------------------
# Conversion: exactness, preset, report
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("tie", [False, True], ids=["dense-head", "factored-head"])
def test_full_rank_conversion_reproduces_teacher_logits(dtype, tol, tie):
    teacher = tiny_teacher(seed=1, dtype=dtype)
    factors = full_rank_factors(teacher.config, range(2), A_SHAPES)
    student, report = kngpt2_from_gpt2(
        teacher, preset=None, kronecker_factors=factors, tie_word_embeddings=tie, progress=False, return_report=True
    )
    assert student.has_factored_head is tie and isinstance(student.lm_head, TiedKroneckerHead) is tie
    assert ("lm_head.weight" in student.state_dict()) is not tie
    assert next(student.parameters()).dtype == dtype and not student.training
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (student(x).logits - teacher(x).logits).abs().max().item()
    print(f"{dtype} tie={tie}: max |logit diff| = {diff:.3e}")
    assert diff < tol
    assert all(m.rel_error < 1e-5 for m in report.modules if m.kind != "dense")
    assert {m.name for m in report.modules if m.kind != "dense"} == set(factors)
    assert student.compression_report is report


def _make_exactly_kronecker(teacher: GPT2LMHeadModel, factor: int = 2) -> None:
    """Overwrite the paper's matrices with exact ``A ⊗ B`` (B of shape (1, factor)) products."""
    g = torch.Generator().manual_seed(3)
    t = teacher.transformer
    with torch.no_grad():
        V, d = t.wte.weight.shape
        t.wte.weight.copy_(torch.kron(torch.randn(V, d // factor, generator=g), torch.randn(1, factor, generator=g)))
        for i in range(1, teacher.config.n_layer, 2):
            for mod in LAYER_MODULES:
                conv = t.get_submodule(f"h.{i}.{mod}")
                out_f, in_f = conv.nf, conv.nx
                W = torch.kron(torch.randn(out_f, in_f // factor, generator=g), torch.randn(1, factor, generator=g))
                conv.weight.copy_(0.1 * W.T)  # Conv1D stores (in, out)


def test_paper_preset_is_exact_on_kronecker_teacher_and_copies_the_rest():
    teacher = tiny_teacher(seed=2, n_layer=4)
    _make_exactly_kronecker(teacher)
    student = kngpt2_from_gpt2(teacher, preset="paper", progress=False)
    s = student.transformer
    # which modules: wte and odd layers, factor 2 on the input axis; dense untied head
    assert isinstance(s.wte, KroneckerEmbedding) and s.wte.b_shape == (1, 2)
    for i in range(4):
        for mod in LAYER_MODULES:
            mine = s.get_submodule(f"h.{i}.{mod}")
            assert isinstance(mine, KroneckerLinear if i % 2 else Conv1D), (i, mod)
            if i % 2:
                assert mine.b_shape == (1, 2) and mine.rank == 1
    assert isinstance(student.lm_head, torch.nn.Linear)
    assert student.lm_head.weight.data_ptr() != s.wte.A.data_ptr() and not student.config.tie_word_embeddings
    # every non-factor weight is the teacher's, and not shared with it
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.endswith((".A", ".B")):
            continue
        assert torch.equal(value, t_state[key]), key
        assert value.data_ptr() != t_state[key].data_ptr(), key
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (student(x).logits - teacher(x).logits).abs().max().item()
    assert diff < 1e-5
    # teacher untouched by the conversion
    assert isinstance(teacher.transformer.h[1].attn.c_attn, Conv1D)


def test_paper_preset_parameter_count_gpt2_small():
    """GPT-2 small with the paper preset, built on the meta device, against the closed form."""
    cfg = GPT2Config()
    V, d, L, P = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_positions
    inner = 4 * d
    ln = 2 * d
    dense_layer = 2 * ln + (3 * d * d + 3 * d) + (d * d + d) + (inner * d + inner) + (d * inner + d)
    kron_layer = 2 * ln + (3 * d * d // 2 + 2 + 3 * d) + (d * d // 2 + 2 + d) + (inner * d // 2 + 2 + inner) + (
        d * inner // 2 + 2 + d
    )
    n_kron = L // 2  # odd layers 1, 3, ..., 11
    without_head = (V * d // 2 + 2) + P * d + n_kron * kron_layer + (L - n_kron) * dense_layer + ln
    head = V * d
    print(f"closed form: {without_head:,} without the head + {head:,} head = {without_head + head:,}")

    kcfg = kngpt2_config_from_gpt2(cfg, preset="paper")
    with torch.device("meta"):
        model = KnGPT2LMHeadModel(kcfg)
    total = count_parameters(model)
    print(f"model: {total:,} ({total - model.lm_head.weight.numel():,} without the head)")
    assert total == without_head + head
    assert total - model.lm_head.weight.numel() == without_head == 83_907_506  # the paper's "~83M"
    assert sum(isinstance(m, KroneckerLinear) for m in model.modules()) == 4 * n_kron
    with torch.device("meta"):
        dense = GPT2LMHeadModel(cfg)
    assert count_parameters(dense) == 124_439_808  # GPT-2 small, head tied


def test_target_fraction_uses_the_foundation_choice():
    teacher = tiny_teacher(seed=4)
    student = kngpt2_from_gpt2(teacher, preset=None, target_fraction=0.25, progress=False)
    kcfg = student.config
    assert set(kcfg.kronecker_factors) == {"wte"} | {f"h.{i}.{m}" for i in range(2) for m in LAYER_MODULES}
    for name, spec in kcfg.kronecker_factors.items():
        out_f, in_f = kcfg.module_shape(name)
        choice = choose_kronecker_factors(out_f, in_f, 0.25)
        assert tuple(spec["a_shape"]) == choice.a_shape, name
        mod = student.transformer.get_submodule(name)
        assert mod.A.numel() + mod.B.numel() == choice.params < out_f * in_f
    report = student.compression_report
    assert report.total_params_after == count_parameters(student) < report.total_params_before


def test_normalize_rescales_to_the_teacher_norm():
    teacher = tiny_teacher(seed=5)
    plain = kngpt2_from_gpt2(teacher, preset="paper", progress=False)
    normed = kngpt2_from_gpt2(teacher, preset="paper", normalize=True, progress=False)
    assert normed.config.kronecker_normalize is True
    W = teacher.transformer.h[1].mlp.c_fc.weight.T
    p = plain.transformer.h[1].mlp.c_fc
    n = normed.transformer.h[1].mlp.c_fc
    assert torch.linalg.norm(kronecker_to_dense(p.A, p.B)) < 0.99 * torch.linalg.norm(W)  # truncation loses norm
    torch.testing.assert_close(torch.linalg.norm(kronecker_to_dense(n.A, n.B)), torch.linalg.norm(W), rtol=1e-5, atol=0)


def test_bare_gpt2model_teacher_uses_its_embedding_as_head():
    teacher = tiny_teacher(seed=6)
    base = GPT2Model(teacher.config)
    base.load_state_dict(teacher.transformer.state_dict())
    base.eval()
    factors = full_rank_factors(teacher.config, [1], A_SHAPES, with_wte=False)
    student = kngpt2_from_gpt2(base, preset=None, kronecker_factors=factors, progress=False)
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (student(x).logits - teacher(x).logits).abs().max() < 1e-5


def test_teacher_given_as_a_local_path(tmp_path):
    teacher = tiny_teacher(seed=14)
    teacher.save_pretrained(tmp_path / "gpt2")
    from_path = kngpt2_from_gpt2(str(tmp_path / "gpt2"), preset="paper")  # with the progress bar
    from_object = kngpt2_from_gpt2(teacher, preset="paper", progress=False)
    for (k1, v1), (k2, v2) in zip(from_path.state_dict().items(), from_object.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_sequence_classification_pools_like_gpt2(tmp_path):
    """Same weights, same pooled logits as GPT2ForSequenceClassification, left and right padding."""
    from transformers import GPT2ForSequenceClassification

    teacher = tiny_teacher(seed=15, pad_token_id=1)
    factors = full_rank_factors(teacher.config, range(2), A_SHAPES)
    kngpt2_from_gpt2(teacher, preset=None, kronecker_factors=factors, progress=False).save_pretrained(tmp_path)
    ours = KnGPT2ForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    ref = GPT2ForSequenceClassification(tiny_gpt2_config(pad_token_id=1, num_labels=3)).eval()
    ref.transformer.load_state_dict(teacher.transformer.state_dict())
    ref.score.load_state_dict(ours.score.state_dict())
    ids = torch.tensor([[1, 1, 5, 6, 7], [5, 6, 7, 1, 1], [8, 9, 10, 11, 12]])
    mask = (ids != 1).long()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
        b = ref(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert a.logits.shape == (3, 3)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Outputs: hidden states, attentions, pre-softmax scores
# ----------------------------------------------------------------------------------------


def test_hidden_states_attentions_and_scores_match_gpt2():
    teacher = tiny_teacher(seed=7, dtype=torch.float64, n_layer=3)
    factors = full_rank_factors(teacher.config, [1], A_SHAPES)
    student = kngpt2_from_gpt2(teacher, preset=None, kronecker_factors=factors, progress=False)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    x = torch.tensor([[1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        t_out = teacher(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        s_out = student(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(s_out.hidden_states) == len(t_out.hidden_states) == 4
    assert len(s_out.attentions) == len(t_out.attentions) == 3
    for a, b in zip(s_out.hidden_states + s_out.attentions, t_out.hidden_states + t_out.attentions):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-10

    # scores in float32: the foundation's score function takes its softmax in float32, which turns
    # float64's mask value into -inf (NaN on fully padded rows), a defect outside this model
    student.float()
    with torch.no_grad():
        probs32 = student(x, attention_mask=mask, output_attentions=True).attentions
        student.set_attn_implementation("kn_eager_scores")
        scores = student(x, attention_mask=mask, output_attentions=True).attentions
    assert len(scores) == 3
    for sc, probs, probs64 in zip(scores, probs32, s_out.attentions):
        assert sc.shape == (2, 4, 6, 6)
        torch.testing.assert_close(torch.softmax(sc, dim=-1), probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(probs.double(), probs64, rtol=0, atol=1e-5)
        # pre-softmax: unmasked entries are raw scores (not probabilities); causal and padding masked
        assert sc[1].tril().abs().max() > 1.0 or (sc[1].tril() < 0).any()
        assert (sc[:, :, 0, 1:] < -1e30).all() and (sc[0, :, :, :2] < -1e30).all()


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["dense-head", "factored-head"])
def test_greedy_generate_same_with_and_without_cache(tie):
    teacher = tiny_teacher(seed=8, scale=4.0, pad_token_id=1)
    student = kngpt2_from_gpt2(teacher, preset="paper", tie_word_embeddings=tie, progress=False).eval()
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True)

    def gen(ids, mask, cache):
        return student.generate(ids, attention_mask=mask, use_cache=cache, **kw)

    single = torch.tensor([[5, 9, 33, 2, 70]])
    batch = torch.tensor([[1, 1, 7, 8, 9], [5, 9, 33, 2, 70]])  # row 0 left-padded with pad id 1
    batch_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for ids, mask in [(single, torch.ones_like(single)), (batch, batch_mask)]:
        cached, uncached = gen(ids, mask, True), gen(ids, mask, False)
        assert cached.sequences.shape == (ids.shape[0], ids.shape[1] + 20)
        assert torch.equal(cached.sequences, uncached.sequences)
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert len(set(cached.sequences[-1, ids.shape[1]:].tolist())) > 1  # not a degenerate constant
    # left padding is handled (positions and mask): the padded row equals its unpadded run
    alone = gen(torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long), True)
    padded = gen(batch, batch_mask, True)
    assert torch.equal(alone.sequences[0, 3:], padded.sequences[0, 5:])


def test_causal_lm_loss_is_shifted():
    teacher = tiny_teacher(seed=9)
    student = kngpt2_from_gpt2(teacher, preset="paper", progress=False)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    out = student(x, labels=x)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert student.loss_type == "ForCausalLM"


# ----------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    teacher = tiny_teacher(seed=10, n_layer=2)
    student = kngpt2_from_gpt2(teacher, preset="paper", progress=False).eval()
    folder = tmp_path_factory.mktemp("kngpt2")
    student.save_pretrained(folder)
    return student, folder


def test_save_pretrained_then_auto_load_is_bit_identical(saved_student):
    student, folder = saved_student
    files = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "modeling_kngpt2.py", "configuration_kngpt2.py", "layers.py",
            "contraction.py", "kronecker_math.py"} <= files
    # the remote code is plain PyTorch: no C source, nothing that compiles or loads a binary
    assert not [f for f in files if not f.endswith((".py", ".json", ".safetensors", ".md"))], files
    for name in files:
        if name.endswith(".py"):
            text = (folder / name).read_text()
            assert not any(word in text for word in ("ctypes", "subprocess", "kernels", "native")), name
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_kngpt2.KnGPT2Config",
        "AutoModel": "modeling_kngpt2.KnGPT2Model",
        "AutoModelForCausalLM": "modeling_kngpt2.KnGPT2LMHeadModel",
        "AutoModelForSequenceClassification": "modeling_kngpt2.KnGPT2ForSequenceClassification",
    }
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is KnGPT2LMHeadModel
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)
    for (k1, v1), (k2, v2) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_factored_head_saves_no_head_weight(tmp_path):
    from safetensors import safe_open

    student = kngpt2_from_gpt2(tiny_teacher(seed=11), preset="paper", tie_word_embeddings=True, progress=False)
    student.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" not in keys
    assert {"transformer.wte.A", "transformer.wte.B"} <= keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert loaded.has_factored_head and torch.equal(loaded(x).logits, student.eval()(x).logits)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockKn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kn_transformers" or name.startswith("kn_transformers."):
                raise ImportError("kn_transformers is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockKn())
    try:
        import kn_transformers  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("kn_transformers should not be importable here")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "KnGPT2LMHeadModel", type(model)
    assert not type(model).__module__.startswith("kn_transformers"), type(model).__module__
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
        model.set_attn_implementation("kn_eager_scores")
        scores = model(ids, output_attentions=True).attentions
    names = [type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
             type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
             type(AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)).__name__]
    torch.save({"logits": logits, "scores": scores, "names": names}, out_path)
    """
)


_LOGITS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import kn_transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
        model.set_attn_implementation("kn_eager_scores")
        scores = model(ids, output_attentions=True).attentions
    torch.save({"logits": logits, "scores": scores}, out_path)
    """
)


def _reproducible_env(**extra) -> dict:
    """A fresh process whose BLAS is reproducible run to run: one thread, and MKL's conditional
    numerical reproducibility (without it, MKL's last bit can change between processes on a loaded
    machine, whatever the calling code does; seen on an Intel Xeon). What remains to compare is
    our code: the same contractions in the same order, no timing, no per-process state."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT", **extra}


def _run_script(script: str, tmp_path, *args, **env) -> None:
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=tmp_path, env=_reproducible_env(**env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_fresh_processes_give_bit_identical_logits(saved_student, tmp_path):
    """The default path has no timing and no per-process state: same model, same bits."""
    _, folder = saved_student
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(8))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "logits.py").write_text(_LOGITS_SCRIPT)
    outs = []
    for i in range(2):
        _run_script(str(tmp_path / "logits.py"), tmp_path, folder, tmp_path / "ids.pt", tmp_path / f"out{i}.pt")
        outs.append(torch.load(tmp_path / f"out{i}.pt"))
    assert torch.equal(outs[0]["logits"], outs[1]["logits"])


def test_trust_remote_code_loads_without_kn_transformers(saved_student, tmp_path):
    student, folder = saved_student
    copy = tmp_path / "copied"
    shutil.copytree(folder, copy)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load_remote.py").write_text(_REMOTE_SCRIPT)
    (tmp_path / "logits.py").write_text(_LOGITS_SCRIPT)
    _run_script(str(tmp_path / "load_remote.py"), tmp_path, copy, tmp_path / "ids.pt", tmp_path / "out.pt",
                HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    out = torch.load(tmp_path / "out.pt")
    assert out["names"] == ["KnGPT2Config", "KnGPT2Model", "KnGPT2ForSequenceClassification"]
    # the same folder through kn_transformers, in a process of the same settings: the same bits
    _run_script(str(tmp_path / "logits.py"), tmp_path, folder, tmp_path / "ids.pt", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt")
    assert torch.equal(out["logits"], ref["logits"])
    assert len(out["scores"]) == len(ref["scores"]) == 2
    for a, b in zip(out["scores"], ref["scores"]):
        assert torch.equal(a, b)
    # and this process (its own thread count, BLAS settings) agrees to rounding
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], student(ids).logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Training: sequence classification on real SST-2
# ----------------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_sequence_classification_trains_on_sst2(shared_data, tmp_path):
    from transformers import DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    with open(shared_data / "glue" / "sst2" / "train.jsonl") as f:
        raw = [json.loads(next(f)) for _ in range(128)]
    rows = []
    for r in raw:
        enc = tokenizer(r["sentence"], truncation=True, max_length=32)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": r["label"]})
    data = _Rows(rows)

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=len(tokenizer)))
    lm = kngpt2_from_gpt2(teacher, preset="paper", tokenizer=tokenizer, progress=False)
    lm.save_pretrained(tmp_path / "lm")
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "lm", num_labels=2, pad_token_id=tokenizer.eos_token_id
    )
    assert type(model) is KnGPT2ForSequenceClassification
    # the loaded Kronecker factors are kept (not re-initialised as missing weights)
    assert torch.equal(model.transformer.wte.A, lm.transformer.wte.A)
    assert torch.equal(model.transformer.h[1].attn.c_attn.B, lm.transformer.h[1].attn.c_attn.B)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, per_device_eval_batch_size=64,
        num_train_epochs=3, learning_rate=2e-3, warmup_steps=0, logging_steps=4, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorWithPadding(tokenizer))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"SST-2 ({len(data)} rows) loss: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bert_checkpoint_is_rejected(tmp_path, minilm_path):
    with pytest.raises(ValueError, match=r"needs a GPT-2 teacher.*'bert'.*kronecker_bert_from_bert") as exc:
        kngpt2_from_gpt2(minilm_path)
    _one_line(exc)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50, pad_token_id=0))
    with pytest.raises(ValueError, match=r"needs a GPT-2 teacher.*'bert'") as exc:
        kngpt2_from_gpt2(bert)
    _one_line(exc)


def test_shapes_that_do_not_divide_are_rejected_before_any_work():
    teacher = tiny_teacher(seed=12)
    with pytest.raises(ValueError, match=r"kronecker_factors\['h\.1\.mlp\.c_fc'\]: a_shape \[7, 2\] does not divide") as exc:
        kngpt2_from_gpt2(teacher, preset=None, kronecker_factors={"h.1.mlp.c_fc": {"a_shape": [7, 2]}})
    _one_line(exc)
    with pytest.raises(ValueError, match=r"layers \[5\] are out of range") as exc:
        kngpt2_from_gpt2(teacher, preset="paper", layers=[1, 5])
    _one_line(exc)
    with pytest.raises(ValueError, match=r"unknown override"):
        kngpt2_from_gpt2(teacher, preset="paper", a_shape=(2, 2))
    with pytest.raises(ValueError, match=r"preset must be one of"):
        kngpt2_from_gpt2(teacher, preset="distil")


def test_tokenizer_larger_than_vocabulary_is_rejected(shared_data):
    tokenizer = AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer has 50257 tokens but the teacher's vocabulary has 96 rows.*"
                                         r"resize_token_embeddings\(50257\)") as exc:
        kngpt2_from_gpt2(tiny_teacher(seed=13), preset="paper", tokenizer=tokenizer)
    _one_line(exc)


def test_out_of_vocabulary_ids_are_refused_as_gpt2_does():
    teacher = tiny_teacher(seed=3)
    student = kngpt2_from_gpt2(teacher, preset="paper", progress=False).eval()
    assert isinstance(student.transformer.wte, KroneckerEmbedding)
    for bad in (-1, VOCAB, VOCAB + 5):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(IndexError):
            teacher(ids)
        with pytest.raises(IndexError, match="outside"):
            student(ids)


def test_classifier_teacher_converts_directly(tmp_path):
    """A GPT2ForSequenceClassification gives a KnGPT2ForSequenceClassification in one conversion:
    the same factors as the LM conversion of the same transformer, the teacher's score head."""
    from transformers import GPT2ForSequenceClassification

    lm = tiny_teacher(seed=21)
    torch.manual_seed(0)
    teacher = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3, pad_token_id=0)).eval()
    teacher.transformer.load_state_dict(lm.transformer.state_dict())
    student = kngpt2_from_gpt2(teacher, preset="paper", progress=False)
    assert type(student).__name__ == "KnGPT2ForSequenceClassification" and student.config.num_labels == 3
    assert torch.equal(student.score.weight, teacher.score.weight) and student.score.weight is not teacher.score.weight
    reference = kngpt2_from_gpt2(lm, preset="paper", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.transformer.state_dict().values(),
                                                  reference.transformer.state_dict().values()))
    ids = torch.randint(2, VOCAB, (2, 7))
    teacher.save_pretrained(tmp_path)
    from_path = kngpt2_from_gpt2(str(tmp_path), preset="paper", progress=False)
    assert torch.equal(from_path(ids).logits, student(ids).logits)
