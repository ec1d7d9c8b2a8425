"""The Kronecker core on every architecture it claims: kroneckerize, save/load through the Auto
classes, generation with the cache, bad input. Tiny random configs of transformers' own classes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

import kn_transformers as kt
from kn_transformers.core import TiedKroneckerHead
from kn_transformers.core.report import count_parameters

sys.path.insert(0, os.path.dirname(__file__))
from architectures import ARCHITECTURES  # noqa: E402

EXACT = dict(target_modules="all-linear", embedding=True, a_shape=[2, 2], rank=4)  # rank 4 = full rank of the split


def _teacher(name, dtype=torch.float32):
    config, auto, causal = ARCHITECTURES[name]
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).eval().to(dtype), getattr(transformers, auto), causal


def _ids(batch=2, length=9, seed=1):
    return torch.randint(3, 98, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kronecker_modules(model):
    return [m for m in model.modules() if isinstance(m, (kt.KroneckerLinear, kt.KroneckerEmbedding))]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_exact_split_matches_dense(name, dtype, tol):
    """A split and rank that represent every weight exactly give the dense model's logits."""
    teacher, _, _ = _teacher(name, dtype)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(**EXACT), progress=False)
    ids = _ids()
    assert _rel(student(ids).logits, teacher(ids).logits) < tol
    linears = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D))]
    replaced = {r.name for r in student.compression_report.modules}
    head = [n for n, m in teacher.named_modules() if m is teacher.get_output_embeddings()]
    assert replaced == set(n for n in linears if n not in head and n.startswith(teacher.base_model_prefix)) | {
        n for n, m in teacher.named_modules() if m is teacher.get_input_embeddings()}
    assert all(r.rel_error < 1e-5 for r in student.compression_report.modules)
    # the teacher is untouched
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not _kronecker_modules(teacher)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_save_and_auto_load_bit_identical(name, tmp_path):
    teacher, auto, _ = _teacher(name)
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules="all-linear", embedding=True, fraction=0.3),
                              progress=False)
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == teacher.config.model_type
    assert saved["quantization_config"]["quant_method"] == "kn-transformers"
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is type(student)
    ids = _ids()
    assert torch.equal(loaded(ids).logits, student(ids).logits)
    kinds = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert kinds(loaded) == kinds(student)
    assert len(_kronecker_modules(loaded)) == len(student.compression_report.modules)
    assert count_parameters(loaded) == student.compression_report.total_params_after
    assert student.compression_report.total_params_after < student.compression_report.total_params_before
    # dtype= and device_map= are transformers' own
    wide = auto.from_pretrained(tmp_path, dtype=torch.float64, device_map="cpu")
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert _rel(wide(ids).logits.float(), student(ids).logits) < 1e-5


@pytest.mark.parametrize("name", [n for n, (_, _, causal) in ARCHITECTURES.items() if causal])
def test_generate_with_and_without_cache(name, tmp_path):
    teacher, auto, _ = _teacher(name)
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules="all-linear", embedding=True, fraction=0.3),
                              progress=False)
    student.save_pretrained(tmp_path)
    model = auto.from_pretrained(tmp_path)
    pad = model.config.pad_token_id
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=pad, eos_token_id=None)
    one = _ids(1, 6)
    a = model.generate(one, attention_mask=torch.ones_like(one), use_cache=True, **kwargs)
    b = model.generate(one, attention_mask=torch.ones_like(one), use_cache=False, **kwargs)
    assert a.shape == (1, 26) and torch.equal(a, b)
    two = _ids(2, 6, seed=2)
    mask = torch.ones_like(two)
    two[0, :2], mask[0, :2] = pad, 0  # left padding
    a = model.generate(two, attention_mask=mask, use_cache=True, **kwargs)
    b = model.generate(two, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(a, b)
    # the padded row generates what it generates alone
    alone = model.generate(two[:1, 2:], attention_mask=mask[:1, 2:], use_cache=True, **kwargs)
    assert torch.equal(a[0, 6:], alone[0, 4:])


def test_tied_head_factored_or_dense():
    teacher, _, _ = _teacher("gpt2")
    ids = _ids()
    factored = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules=None, embedding=True, a_shape=[2, 2], rank=4),
                               progress=False)
    assert isinstance(factored.lm_head, TiedKroneckerHead)
    assert "lm_head.weight" not in factored.state_dict()
    dense = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules=None, embedding=True, a_shape=[2, 1],
                                                        tied_head="dense"), progress=False)
    assert isinstance(dense.lm_head, nn.Linear) and not dense.config.tie_word_embeddings
    assert torch.equal(dense.lm_head.weight, teacher.lm_head.weight)
    for student in (factored, dense):
        assert _rel(student(ids).logits, teacher(ids).logits) < (1e-5 if student is factored else 10)


def test_targeting_rules():
    teacher, _, _ = _teacher("llama")
    cfg = kt.KroneckerConfig(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.0\.self_attn.*",
                             layers=[0, 1], fraction=0.25, rank_pattern={"down_proj": 2},
                             shape_pattern={"q_proj": [4, 4]})
    modules = kt.core.resolve_modules(teacher, cfg)
    assert list(modules) == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                             "model.layers.1.mlp.down_proj"]
    assert modules["model.layers.1.self_attn.q_proj"]["a_shape"] == [4, 4]
    assert modules["model.layers.0.mlp.down_proj"]["rank"] == 2
    only = kt.core.resolve_modules(teacher, kt.KroneckerConfig(target_modules=r".*\.mlp\..*", layers=1, fraction=0.25))
    assert list(only) == [f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]


def test_config_json_round_trip(tmp_path):
    cfg = kt.KroneckerConfig(target_modules=["q_proj"], fraction=0.1, rank=2, rank_pattern={"q": 3})
    path = tmp_path / "k.json"
    cfg.to_json_file(path)
    assert kt.KroneckerConfig.from_json_file(path) == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["q_prj"], fraction=0.25), r"target_modules \['q_prj'\] match no module"),
    (dict(target_modules=r"nothing\..*", fraction=0.25), "matches no module"),
    (dict(target_modules=["self_attn"], fraction=0.25), "LlamaAttention, which the Kronecker module table does not know"),
    (dict(target_modules=["input_layernorm"], fraction=0.25), "LlamaRMSNorm, which the Kronecker module table"),
    (dict(target_modules=["q_proj"], a_shape=[3, 2]), r"module 'model.layers.0.self_attn.q_proj': a_shape \[3, 2\] does not divide the \(out, in\) shape \(32, 32\)"),
    (dict(target_modules=["q_proj"], fraction=0.25, layers=[5]), r"layers \[5\] do not exist"),
    (dict(target_modules=["q_proj", "k_proj"], shape_pattern={"q_proj": [2, 2]}),
     r"module 'model.layers.0.self_attn.k_proj' matches no shape_pattern key and neither a_shape nor fraction"),
    (dict(target_modules=["q_proj"], a_shape=[2, 2], rank=9), r"rank 9 is not possible for A 2x2 and B 16x16: use 1\.\.4"),
])
def test_bad_targets(kwargs, match):
    teacher, _, _ = _teacher("llama")
    with pytest.raises(ValueError, match=match):
        kt.kroneckerize(teacher, kt.KroneckerConfig(**kwargs), progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(a_shape=[2, 2], fraction=0.5), "exactly one of a_shape"),
    (dict(), "exactly one of a_shape"),
    (dict(fraction=1.5), r"fraction must be a number in \(0, 1\)"),
    (dict(fraction=0.5, init="lsq"), "init must be one of"),
    (dict(fraction=0.5, tied_head="tied"), "tied_head must be one of"),
    (dict(fraction=0.5, target_modules=7), "target_modules must be"),
    (dict(fraction=0.5, target_modules="(["), "not a valid regular expression"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kt.KroneckerConfig(**kwargs)


def test_already_compressed_is_refused():
    teacher, _, _ = _teacher("llama")
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(fraction=0.25), progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        kt.kroneckerize(student, kt.KroneckerConfig(fraction=0.25), progress=False)


def _saved(tmp_path, name="llama"):
    teacher, auto, _ = _teacher(name)
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(fraction=0.25, embedding=True), progress=False)
    student.save_pretrained(tmp_path)
    return auto, json.loads((tmp_path / "config.json").read_text())


def test_config_that_disagrees_with_weights_is_an_error(tmp_path):
    auto, config = _saved(tmp_path)
    name = "model.layers.1.mlp.up_proj"
    edited = json.loads(json.dumps(config))
    edited["quantization_config"]["modules"][name]["a_shape"] = [2, 2]
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=f"config.json says {name}.A is"):
        auto.from_pretrained(tmp_path)
    edited = json.loads(json.dumps(config))
    del edited["quantization_config"]["modules"][name]
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=f"factors for '{name}', which config.json"):
        auto.from_pretrained(tmp_path)


def test_loading_without_the_package_says_what_to_install(tmp_path):
    _saved(tmp_path)
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'kn_transformers': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "kn-transformers" in out.stderr + out.stdout, out.stderr[-2000:]


def _lm_rows(rows=64, length=12, vocab=98, seed=1):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, vocab, (rows, 1), generator=g)
    ids = 3 + (start - 3 + torch.arange(length)) % (vocab - 3)  # next token = this one + 1: learnable
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


@pytest.mark.parametrize("name,preset,terms", [
    ("llama", "kngpt2", ["loss_hidden", "loss_attention", "loss_logits"]),
    ("roberta", "kroneckerbert", ["loss_attention", "loss_ffn", "loss_logits"]),
])
def test_ilkd_on_any_architecture_every_term_falls(name, preset, terms, tmp_path):
    """ILKD matches layers through transformers' own outputs (hidden states, attention scores) and
    the per-model-type FFN table: a Kronecker Llama of a Llama, a Kronecker RoBERTa of a RoBERTa."""
    teacher, _, _ = _teacher(name)
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(fraction=0.25), progress=False)
    for p in student.parameters():  # start away from the teacher so every term has room to fall
        p.data.add_(0.05 * torch.randn_like(p))
    args = kt.DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=30,
                                    learning_rate=3e-3, logging_steps=10, report_to=[], use_cpu=True, seed=0,
                                    disable_tqdm=True, save_strategy="no", distill_preset=preset,
                                    labels_weight=0.0)  # a random teacher: labels would pull elsewhere
    trainer = kt.ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=_lm_rows())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    logged = [k for k in logs[0] if k.startswith("loss_") and k != "loss_labels"]
    assert set(terms) <= set(logged)
    for term in logged:
        assert logs[-1][term] < logs[0][term], (term, [h[term] for h in logs])


@pytest.mark.parametrize("family", ["kngpt2", "kronecker-bert"])
@pytest.mark.parametrize("remote", [False, True])
def test_paper_model_with_edited_factor_map_is_an_error(family, remote, tmp_path):
    """A hand-edited config.json without kronecker_factors used to load a different model silently."""
    if family == "kngpt2":
        teacher = transformers.GPT2LMHeadModel(ARCHITECTURES["gpt2"][0])
        student, auto = kt.kngpt2_from_gpt2(teacher, progress=False), transformers.AutoModelForCausalLM
    else:
        teacher = transformers.BertModel(ARCHITECTURES["bert"][0])
        student, auto = kt.kronecker_bert_from_bert(teacher, progress=False), transformers.AutoModel
    student.save_pretrained(tmp_path)
    auto.from_pretrained(tmp_path, trust_remote_code=remote)  # as saved: loads
    saved = (tmp_path / "config.json").read_text()
    config = json.loads(saved)
    config.pop("kronecker_factors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kronecker_factors and the weights disagree"):
        auto.from_pretrained(tmp_path, trust_remote_code=remote)
    if family == "kngpt2":  # the other way round: factors listed where the checkpoint holds a dense matrix
        config = json.loads(saved)
        assert "h.0.mlp.c_fc" not in config["kronecker_factors"]
        config["kronecker_factors"]["h.0.mlp.c_fc"] = {"a_shape": [2, 2], "rank": 1}
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"no factors for modules the config lists \(transformer\.h\.0\.mlp\.c_fc"):
            auto.from_pretrained(tmp_path, trust_remote_code=remote)


def test_real_minilm_all_linear(minilm_path, tmp_path):
    """The real pretrained MiniLM: an exact split reproduces it; a 25% student round-trips through AutoModel."""
    teacher = transformers.AutoModel.from_pretrained(minilm_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a gripping, funny film", "the plot never comes together at all"], padding=True,
                return_tensors="pt")
    ref = teacher(**batch).last_hidden_state
    exact = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules="all-linear", a_shape=[2, 2], rank=4),
                            progress=False)
    assert _rel(exact(**batch).last_hidden_state, ref) < 1e-5
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(target_modules="all-linear", embedding=True, fraction=0.25),
                              progress=False)
    report = student.compression_report
    assert len(report.modules) == 6 * 6 + 1 + 1  # six matrices per layer, the pooler, the embedding
    assert report.total_params_after < 0.4 * report.total_params_before
    student.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(**batch).last_hidden_state, student(**batch).last_hidden_state)


def test_cli_compress_any_model_folder(tmp_path, capsys):
    from kn_transformers.cli import main

    teacher, auto, _ = _teacher("qwen2")
    teacher.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "k"), "--fraction", "0.25",
                 "--target_modules", "q_proj,k_proj,v_proj,o_proj", "--rank", "2", "--embedding"]) == 0
    loaded = auto.from_pretrained(tmp_path / "k")
    modules = loaded.config.quantization_config.modules
    assert len(modules) == 2 * 4 + 1 and all(s["rank"] == 2 for s in modules.values())
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, kt.KroneckerLinear)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, nn.Linear)
    card = (tmp_path / "k" / "README.md").read_text()
    assert "pip install kn-transformers" in card and "pipeline_tag: text-generation" in card
    assert main(["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "k2"), "--a_shape", "4,4"]) == 0
    assert all(s["a_shape"] == [4, 4] for s in auto.from_pretrained(tmp_path / "k2").config.quantization_config
               .modules.values())
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "k3")]) == 2
    assert "compresses with --fraction 0.25" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "k4"), "--a_shape", "3,2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("kn-transformers: error: module 'model.layers.0.self_attn.q_proj': a_shape [3, 2] does not "
                           "divide")


def test_kronecker_bert_from_bert_takes_bert_shaped_encoders(tmp_path):
    """RoBERTa and ELECTRA have BERT's module names: the paper presets apply to them through kroneckerize."""
    from kn_transformers.models.kronecker_bert.convert_bert import PRESETS

    def shapes(**extra):
        return dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    **extra)

    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**shapes())).eval()
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**shapes())).eval()
    electra = transformers.ElectraModel(transformers.ElectraConfig(**shapes(embedding_size=16))).eval()
    for preset in ("kroneckerbert8", "kroneckerbert21"):
        paper = kt.kronecker_bert_from_bert(bert, preset, progress=False)
        student = kt.kronecker_bert_from_bert(roberta, preset, progress=False)
        assert type(student) is transformers.RobertaForSequenceClassification
        # the same factors as KroneckerBERT's, module by module, and the SVD init of the teacher's weights
        ours = {n.removeprefix("roberta."): (tuple(m.A.shape), tuple(m.B.shape))
                for n, m in student.named_modules() if isinstance(m, (kt.KroneckerLinear, kt.KroneckerEmbedding))}
        theirs = {n.removeprefix("bert."): (tuple(m.A.shape), tuple(m.B.shape))
                  for n, m in paper.named_modules() if isinstance(m, (kt.KroneckerLinear, kt.KroneckerEmbedding))}
        assert ours == theirs and len(ours) == 1 + 2 * 6
        q = student.roberta.encoder.layer[1].attention.self.query
        A, B = kt.nearest_kronecker(roberta.roberta.encoder.layer[1].attention.self.query.weight, q.a_shape)
        assert torch.equal(q.A, A) and torch.equal(q.B, B)
    student.save_pretrained(tmp_path / "roberta")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "roberta").eval()
    ids = _ids()
    assert torch.equal(loaded(ids).logits, student(ids).logits)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in student.parameters())

    from kn_transformers.cli import main  # the paper preset from the shell, for a RoBERTa folder

    roberta.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--preset", "kroneckerbert21", "--output_dir",
                 str(tmp_path / "cli")]) == 0
    from_cli = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cli").eval()
    assert torch.equal(from_cli(ids).logits, student(ids).logits)

    small = kt.kronecker_bert_from_bert(electra, "kroneckerbert8", progress=False)
    emb = small.embeddings.word_embeddings  # ELECTRA's embeddings are 16 wide, the encoder 32
    assert isinstance(emb, kt.KroneckerEmbedding) and emb.a_shape == (96, 16 // PRESETS["kroneckerbert8"].embedding_n)
    assert small(ids).last_hidden_state.shape == (2, 9, 32)
    with pytest.raises(ValueError, match=r"head= applies to BERT teachers.*RobertaForSequenceClassification"):
        kt.kronecker_bert_from_bert(roberta, head="masked-lm", progress=False)
    with pytest.raises(ValueError, match=r"\['num_labels'\] do not apply to a roberta teacher"):
        kt.kronecker_bert_from_bert(roberta, num_labels=3, progress=False)
    with pytest.raises(ValueError, match=r"needs a BERT teacher .*roberta, xlm-roberta, electra.*'llama'"):
        kt.kronecker_bert_from_bert(_teacher("llama")[0], progress=False)


def test_paper_preset_parameter_counts_are_unchanged():
    """The paper models' sizes at full width (built on the meta device: no memory)."""
    from kn_transformers.models.kronecker_bert.convert_bert import kronecker_bert_config
    from kn_transformers.models.kngpt2.convert_gpt2 import kngpt2_config_from_gpt2

    with torch.device("meta"):
        gpt2 = kt.KnGPT2LMHeadModel(kngpt2_config_from_gpt2(transformers.GPT2Config(), "paper"))
        bert8 = kt.KroneckerBertModel(kronecker_bert_config(transformers.BertConfig(), "kroneckerbert8"))
        bert21 = kt.KroneckerBertModel(kronecker_bert_config(transformers.BertConfig(), "kroneckerbert21"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (gpt2, bert8, bert21)]
    assert counts == [122_504_882, 14_654_216, 5_228_272]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_merge_to_dense_any_architecture(name, tmp_path):
    """A kroneckerized model merges back to its own dense class: same logits, no quantization entry."""
    teacher, auto, _ = _teacher(name)
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(fraction=0.25, embedding=True), progress=False)
    dense = kt.merge_to_dense(student)
    assert type(dense) is type(teacher) and not _kronecker_modules(dense)
    ids = _ids()
    assert _rel(dense(ids).logits, student(ids).logits) < 1e-5
    dense.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in reloaded.state_dict().items())
    # the same weights; logits not bitwise: BLAS may take another kernel for memory-mapped tensors
    assert _rel(reloaded(ids).logits, dense(ids).logits) < 1e-6


def test_cli_export_dense_of_a_kroneckerized_folder(tmp_path):
    from kn_transformers.cli import main

    teacher, auto, _ = _teacher("llama")
    student = kt.kroneckerize(teacher, kt.KroneckerConfig(fraction=0.25), progress=False)
    student.save_pretrained(tmp_path / "k")
    assert main(["export", str(tmp_path / "k"), str(tmp_path / "dense"), "--format", "dense"]) == 0
    loaded = auto.from_pretrained(tmp_path / "dense").eval()
    assert not _kronecker_modules(loaded)
    ids = _ids()
    assert _rel(loaded(ids).logits, student(ids).logits) < 1e-5
