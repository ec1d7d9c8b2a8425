"""Deployment: merge_to_dense (vanilla architecture, loads without kn_transformers) and export_onnx
(factored graph, real onnxruntime sessions, greedy generation through the KV-cache graph)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

import kn_transformers as K
from kn_transformers import merge_to_dense

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from kn_transformers.export import check_factored_graph, export_onnx, quantize_onnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from architectures import ARCHITECTURES  # noqa: E402

VOCAB = 300


def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, **kw)
    return cfg


def _bert_config():
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=VOCAB, max_position_embeddings=40)


def _kngpt2(tied: bool):
    teacher = GPT2LMHeadModel(_gpt2()).eval()
    return K.kngpt2_from_gpt2(teacher, preset="paper", tie_word_embeddings=tied, progress=False).eval()


def _kbert(cls=BertForSequenceClassification, preset="kroneckerbert8"):
    torch.manual_seed(0)
    teacher = cls(_bert_config()).eval()
    return K.kronecker_bert_from_bert(teacher, preset=preset, progress=False).eval()


def _close(a, b, rtol):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


def _ids(batch, length, pad_last=0):
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[0, -pad_last:] = 0
    return ids, mask


# -- merge_to_dense ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["factored-tied-head", "paper-untied-head"])
def test_merge_kngpt2_lm_is_gpt2_with_the_same_logits(tied):
    student = _kngpt2(tied)
    assert student.has_factored_head == tied
    dense = merge_to_dense(student)
    assert type(dense) is GPT2LMHeadModel and not dense.training
    assert dense.config.model_type == "gpt2"
    assert not {k for k in dense.config.to_dict() if k.startswith("kronecker") or k == "auto_map"}
    assert (dense.lm_head.weight is dense.transformer.wte.weight) == tied
    ids, mask = _ids(2, 12, pad_last=3)
    _close(dense(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits, 1e-5)
    # the student is untouched and still Kronecker
    assert isinstance(student.transformer.h[1].attn.c_attn, K.KroneckerLinear)


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForMaskedLM, BertForQuestionAnswering])
def test_merge_kronecker_bert_heads(cls):
    student = _kbert(cls)
    dense = merge_to_dense(student)
    assert type(dense) is cls
    ids, mask = _ids(3, 9, pad_last=2)
    s_out, d_out = student(ids, attention_mask=mask), dense(ids, attention_mask=mask)
    for key in ("logits", "start_logits", "end_logits"):
        if key in s_out:
            _close(d_out[key], s_out[key], 1e-5)
    if cls is BertForMaskedLM:  # the factored decoder becomes BERT's tied decoder
        assert dense.cls.predictions.decoder.weight is dense.bert.embeddings.word_embeddings.weight


def test_merge_kngpt2_classifier_and_float64():
    teacher = GPT2ForSequenceClassification(_gpt2(num_labels=3)).double().eval()
    from kn_transformers.recipes.students import convert_to_student

    student = convert_to_student(teacher, "paper", None, "sequence-classification").eval()
    dense = merge_to_dense(student)
    assert type(dense) is GPT2ForSequenceClassification and dense.dtype == torch.float64
    ids, mask = _ids(2, 7)
    _close(dense(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits, 1e-10)


def test_merge_of_an_optimised_model_matches():
    student = K.optimize_for_inference(_kbert(), native=False)
    dense = merge_to_dense(student)
    ids, mask = _ids(2, 8)
    _close(dense(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits, 1e-5)


def test_merge_rejects_models_that_are_not_kronecker():
    with pytest.raises(TypeError, match="merge_to_dense expects a Kronecker transformers model"):
        merge_to_dense(GPT2LMHeadModel(_gpt2()))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        merge_to_dense(K.KroneckerLinear(4, 4, (2, 2)))


def test_merged_folder_loads_without_kn_transformers(tmp_path):
    student = _kngpt2(tied=True)
    dense = merge_to_dense(student)
    dense.save_pretrained(tmp_path / "dense")
    saved = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and "auto_map" not in saved
    assert not any(k.startswith("kronecker") for k in saved)
    assert not list((tmp_path / "dense").glob("*.py"))
    ids, mask = _ids(2, 10, pad_last=2)
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    np.save(tmp_path / "ref.npy", student(ids, attention_mask=mask).logits.detach().numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["kn_transformers"] = None  # any import of the package fails
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r}).eval()
        assert type(m).__name__ == "GPT2LMHeadModel"
        ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))
        mask = torch.from_numpy(np.load({str(tmp_path / 'mask.npy')!r}))
        out = m(ids, attention_mask=mask).logits.detach().numpy()
        ref = np.load({str(tmp_path / 'ref.npy')!r})
        print(float(np.abs(out - ref).max() / np.abs(ref).max()))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-5


# -- ONNX export -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    student = _kbert()
    path = export_onnx(student, tmp_path_factory.mktemp("kbert"))
    return student, path


@pytest.fixture(scope="module")
def kngpt2_onnx(tmp_path_factory):
    student = _kngpt2(tied=True)
    path = export_onnx(student, tmp_path_factory.mktemp("kngpt2") / "decoder.onnx")
    return student, path


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_kronecker_bert_onnx_matches_pytorch(bert_onnx):
    student, path = bert_onnx
    assert path.name == "model.onnx"
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for batch, length in ((1, 5), (4, 23)):
        ids, mask = _ids(batch, length, pad_last=2 if batch > 1 else 0)
        types = torch.zeros_like(ids)
        out = sess.run(None, dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), token_type_ids=types.numpy()))
        ref = student(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        _close(out[0], ref.detach(), 1e-4)


@pytest.mark.parametrize("preset", ["kroneckerbert8", "kroneckerbert21"])
def test_graph_orders_export_factored_and_match(preset, tmp_path):
    # the forms export_onnx picks for graph runtimes: no transpose of the activations where one can
    # be avoided (A ⊗ I for a small B, broadcast matmuls for a tiny A, one GEMM per column of B)
    from kn_transformers.core.contraction import graph_contraction_order
    from kn_transformers.core.layers import KroneckerLinear

    student = _kbert(preset=preset)
    orders = {graph_contraction_order(m.A, m.B) for m in student.modules() if isinstance(m, KroneckerLinear)}
    assert orders == ({"a_first_cols", "b_first_bmm", "a_first_bmm"} if preset == "kroneckerbert8"
                      else {"b_first_expand", "a_first_expand"})
    path = export_onnx(student, tmp_path)
    check_factored_graph(path, student)
    sess = _session(path)
    for batch, length in ((1, 5), (3, 17)):
        ids, mask = _ids(batch, length, pad_last=2 if batch > 1 else 0)
        types = torch.zeros_like(ids)
        out = sess.run(None, dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), token_type_ids=types.numpy()))
        _close(out[0], student(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.detach(), 1e-4)
    assert all(m.order == "auto" for m in student.modules() if isinstance(m, KroneckerLinear))  # restored
    assert not any(m.bias_last for m in student.modules() if isinstance(m, KroneckerLinear))


def test_exported_biases_fuse_in_onnx_runtime(tmp_path):
    # each Kronecker layer's bias is added after its contraction, in the activations' shape, so ONNX
    # Runtime fuses it: FFN bias + GELU into BiasGelu, no separate Add of the FFN's 4d-wide bias
    student = _kbert()
    path = export_onnx(student, tmp_path)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimised.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    layers = student.config.num_hidden_layers
    assert ops.count("BiasGelu") == layers, sorted(set(ops))
    assert ops.count("SkipLayerNormalization") == 2 * layers


def test_onnx_graph_keeps_the_factors(bert_onnx, tmp_path):
    student, path = bert_onnx
    check_factored_graph(path, student)  # no constant or static tensor of a full matrix's size
    graph = onnx.load(str(path))
    stored = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    assert stored <= 1.02 * sum(p.numel() for p in student.parameters())
    # the check can fail: the merged dense model's graph holds the full matrices
    dense_path = export_onnx(merge_to_dense(student), tmp_path / "dense.onnx")
    with pytest.raises(AssertionError, match="full matrix"):
        check_factored_graph(dense_path, student)


def test_kngpt2_onnx_with_past_matches_pytorch_and_generates_greedily(kngpt2_onnx):
    student, path = kngpt2_onnx
    check_factored_graph(path, student)
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in sess.get_outputs()][:2] == ["logits", "present.0.key"]
    cfg = student.config
    layers, heads, head_dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    past_names = names[3:]
    # two shapes, empty past
    for batch, length in ((1, 6), (3, 11)):
        ids, _ = _ids(batch, length)
        feeds = dict(input_ids=ids.numpy(), attention_mask=np.ones((batch, length), np.int64),
                     position_ids=np.tile(np.arange(length), (batch, 1)),
                     **{n: np.zeros((batch, heads, 0, head_dim), np.float32) for n in past_names})
        _close(sess.run(None, feeds)[0], student(ids).logits.detach(), 1e-4)
    # greedy generation of 20 tokens through the cache, batch 1
    prompt, _ = _ids(1, 5)
    expected = student.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert _greedy_through_onnx(sess, prompt, 20) == expected
    assert len(past_names) == 2 * layers


def _empty_past(sess, batch):
    """Zero-length ``past_key_values.*`` feeds (the first step) for the graph's cache inputs."""
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def _greedy_through_onnx(sess, prompt, steps):
    """``steps`` greedy tokens from ``prompt`` (``1 × length``), each step feeding the graph's
    ``present.*`` outputs back as ``past_key_values.*`` (the KV-cache contract of the export)."""
    past = _empty_past(sess, 1)
    current, seen, generated = prompt.numpy(), 0, []
    for _ in range(steps):
        length = current.shape[1]
        outs = sess.run(None, dict(input_ids=current, attention_mask=np.ones((1, seen + length), np.int64),
                                   position_ids=np.arange(seen, seen + length)[None], **past))
        token = int(outs[0][0, -1].argmax())
        generated.append(token)
        past = dict(zip(past, outs[1:]))
        assert next(iter(past.values())).shape[2] == seen + length
        seen, current = seen + length, np.array([[token]])
    return generated


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_kroneckerized_architectures_export_factored_and_match(name, tmp_path):
    """Every architecture of the core's test table: ``kroneckerize`` then ``export_onnx`` keeps the
    factors, matches PyTorch for two shapes, and (causal ones) generates greedily through the cache."""
    config, auto, causal = ARCHITECTURES[name]
    torch.manual_seed(0)
    teacher = getattr(transformers, auto).from_config(config).eval()
    student = K.kroneckerize(teacher, K.KroneckerConfig(fraction=0.25, embedding=True), progress=False).eval()
    path = export_onnx(student, tmp_path)
    check_factored_graph(path, student)
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    g = torch.Generator().manual_seed(0)
    for batch, length in ((1, 5), (3, 11)):
        ids = torch.randint(3, config.vocab_size, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        feeds = dict(input_ids=ids.numpy(), attention_mask=mask.numpy())
        if causal:
            feeds["position_ids"] = np.tile(np.arange(length), (batch, 1))
            feeds.update(_empty_past(sess, batch))
        else:
            mask[0, -2:] = 0  # padding in the first row
            feeds["attention_mask"] = mask.numpy()
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        with torch.no_grad():
            ref = student(input_ids=ids, attention_mask=mask).logits
        _close(sess.run(None, feeds)[0], ref, 1e-4)
    if causal:
        prompt = torch.randint(3, config.vocab_size, (1, 6), generator=g)
        expected = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                                    pad_token_id=config.pad_token_id, eos_token_id=None)[0, 6:].tolist()
        assert _greedy_through_onnx(sess, prompt, 20) == expected


def test_export_of_an_optimised_model_takes_the_plain_path(tmp_path):
    student = K.optimize_for_inference(_kbert(preset="kroneckerbert21"))  # native kernel where available
    before = [(type(m).__name__, getattr(m, "order", None)) for m in student.modules()]
    path = export_onnx(student, tmp_path / "m.onnx")
    assert [(type(m).__name__, getattr(m, "order", None)) for m in student.modules()] == before  # restored
    assert not any(n.domain.startswith("kn_transformers") for n in onnx.load(str(path)).graph.node)
    ids, mask = _ids(2, 9)
    types = torch.zeros_like(ids)
    out = _session(path).run(None, dict(input_ids=ids.numpy(), attention_mask=mask.numpy(),
                                        token_type_ids=types.numpy()))[0]
    _close(out, student(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.detach(), 1e-4)


def _assert_int8_close(fp32_path, int8_path, batch, length):
    """The encoder's int8 graph gives the fp32 graph's outputs in real ORT sessions, to int8 precision."""
    ids, mask = _ids(batch, length)
    feeds = dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), token_type_ids=np.zeros_like(ids.numpy()))
    fp32, int8 = _session(fp32_path).run(None, feeds)[0], _session(int8_path).run(None, feeds)[0]
    assert np.abs(int8 - fp32).max() <= 0.1 * np.abs(fp32).max() + 1e-3  # int8 weights: close, not equal


def test_int8_quantisation_is_smaller_and_close(bert_onnx, tmp_path):
    student, path = bert_onnx
    q = quantize_onnx(path, tmp_path / "q.onnx")
    assert q.stat().st_size < path.stat().st_size
    _assert_int8_close(path, q, 4, 16)


def test_int8_quantises_each_layers_large_factor_and_keeps_the_factored_form(tmp_path):
    # factors of 64x64 (and 2x2, 8x2): the exported graph reshapes and transposes them in-graph, so
    # without folding them first the quantiser would quantise only the 2x2 / 8x2 stages
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, vocab_size=VOCAB,
        max_position_embeddings=40)).eval()
    student = K.kronecker_bert_from_bert(teacher, preset="kroneckerbert8", progress=False).eval()
    path = export_onnx(student, tmp_path / "m.onnx")
    q = quantize_onnx(path)
    graph = onnx.load(str(q))
    int8 = {t.name: tuple(t.dims) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    quantized = {n.input[1]: int8[n.input[1]] for n in graph.graph.node
                 if n.op_type == "MatMulInteger" and n.input[1] in int8}
    layers = [m for m in student.modules() if isinstance(m, K.KroneckerLinear)]
    large = {tuple(sorted(max(m.A, m.B, key=torch.numel).shape[1:])) for m in layers}
    assert large == {(64, 64)}
    assert len(quantized) >= len(layers)  # every layer's large factor multiplies in int8 (and the pooler)
    assert all(min(dims) >= 32 for dims in quantized.values())  # the 2x2 / 8x2 stages stay fp32
    check_factored_graph(graph, student)  # int8 factors, no full matrix
    _assert_int8_close(path, q, 3, 12)


def test_int8_of_a_graph_with_external_weights(bert_onnx, tmp_path):
    # graphs over protobuf's 2 GB keep their weights beside the .onnx file: the int8 graph does too
    student, path = bert_onnx
    onnx.save(onnx.load(str(path)), str(tmp_path / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=1024)
    q = quantize_onnx(tmp_path / "m.onnx")
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(q), load_external_data=False).graph.initializer)
    _assert_int8_close(path, q, 2, 8)


def test_export_bad_input(tmp_path):
    student = _kbert()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="export_onnx knows the architectures .* not 't5'") as exc:
        export_onnx(t5, tmp_path / "t5.onnx")
    assert "\n" not in str(exc.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="choose a writable folder"):
        export_onnx(student, blocker / "sub" / "m.onnx")
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18, "):
        export_onnx(student, tmp_path / "m.onnx", opset=11)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        quantize_onnx(tmp_path / "missing.onnx")
    path = export_onnx(student, tmp_path / "ok.onnx")
    with pytest.raises(ValueError, match="min_weight_dim must be an integer >= 1, got 0"):
        quantize_onnx(path, min_weight_dim=0)
    # every tensor external, shape constants included: ONNX Runtime cannot load it, so nothing is folded
    onnx.save(onnx.load(str(path)), str(tmp_path / "bad.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="bad.onnx.data", size_threshold=0)
    with pytest.raises(RuntimeError, match="ONNX Runtime could not pre-process .*bad.onnx") as exc:
        quantize_onnx(tmp_path / "bad.onnx")
    assert "\n" not in str(exc.value)


def test_cli_export_dense_and_onnx(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from kn_transformers.cli import main

    student = _kbert()
    student.save_pretrained(tmp_path / "student")
    assert main(["export", str(tmp_path / "student"), str(tmp_path / "dense"), "--format", "dense"]) == 0
    dense = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    assert type(dense) is BertForSequenceClassification
    ids, mask = _ids(2, 6)
    _close(dense(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits, 1e-5)

    assert main(["export", str(tmp_path / "student"), str(tmp_path / "onnx"), "--format", "onnx",
                 "--quantize", "int8"]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "model.int8.onnx").is_file()
    assert (tmp_path / "onnx" / "config.json").is_file()
    assert "int8:" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "student"), str(tmp_path / "x"), "--format", "dense",
                 "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize int8 applies to --format onnx" in err[0]
