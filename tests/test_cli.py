import json

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from kn_transformers import kronecker_to_dense, nearest_kronecker
from kn_transformers.cli import main


def test_report_on_a_saved_gpt2_covers_conv1d_and_embeddings(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16))
    model.save_pretrained(tmp_path / "m")
    assert main(["report", str(tmp_path / "m"), "--fraction", "0.25", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "h.1.mlp.c_fc" in out and "Total parameters" in out
    report = json.loads((tmp_path / "r.json").read_text())
    names = {m["name"]: m for m in report["modules"]}
    # wte, wpe and 4 Conv1D per layer
    assert {"wte", "wpe", "h.0.attn.c_attn", "h.1.mlp.c_proj"} <= names.keys()
    row = names["h.0.attn.c_attn"]
    assert row["shape"] == [96, 32]  # (out, in): Conv1D stores in x out
    # the reported error is the nearest-Kronecker error of the (out, in) weight
    W = model.h[0].attn.c_attn.weight.T.double()
    A, B = nearest_kronecker(W, row["a_shape"])
    err = (torch.linalg.norm(W - kronecker_to_dense(A, B)) / torch.linalg.norm(W)).item()
    assert row["rel_error"] == pytest.approx(err, rel=1e-6)
    saved = sum(m["params_before"] - m["params_after"] for m in report["modules"])
    assert report["total_params_after"] == report["total_params_before"] - saved
    assert report["total_params_before"] == sum(p.numel() for p in model.parameters())


def test_report_keeps_too_small_matrices_dense():
    from torch import nn

    from kn_transformers.cli import decomposition_report

    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 64))  # a 3x1 matrix has no smaller split
    report = decomposition_report(model, fraction=0.25)
    assert [m.kind for m in report.modules] == ["dense", "linear"]
    assert report.modules[0].params_after == 3
    assert report.total_params_after == report.total_params_before - (192 - report.modules[1].params_after)


@pytest.mark.integration
def test_report_decomposes_the_real_minilm_teacher_by_default(tmp_path, capsys):
    assert main(["report", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["total_params_before"] == 22_713_216  # all-MiniLM-L6-v2
    linears = [m for m in report["modules"] if m["kind"] == "linear"]
    assert len(linears) == 6 * 6 + 1  # Q, K, V, O, FFN in, FFN out per layer, plus the pooler
    assert 3.5 < report["compression"] < 4.5
    # a real pretrained matrix is far from Kronecker at a quarter of its parameters
    assert all(0.3 < m["rel_error"] < 1 for m in linears)


@pytest.fixture
def gpt2_with_tokenizer(tmp_path, shared_data):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=32))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lines = [ln.strip() for ln in open(shared_data / "wikitext-2" / "valid.txt") if len(ln.strip()) > 40][:40]
    (tmp_path / "calib.txt").write_text("\n".join(lines))
    return tmp_path


def test_compress_calibrates_sequentially_and_under_a_budget(gpt2_with_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    import kn_transformers  # noqa: F401

    root = gpt2_with_tokenizer
    calib = str(root / "calib.txt")
    assert main(["compress", str(root / "m"), "--output_dir", str(root / "a"), "--fraction", "0.25",
                 "--calibration_file", calib, "--calibration_samples", "8", "--max_length", "32", "--sequential"]) == 0
    report = json.loads((root / "a" / "compression_report.json").read_text())
    assert all(m["init"] == "activation" and m["output_error"] is not None for m in report["modules"])
    loaded = AutoModelForCausalLM.from_pretrained(root / "a")
    assert loaded.config.quantization_config.sequential is True
    # a budget through the paper converter (a GPT-2 teacher: the preset also factors the 50k-row
    # embedding and unties the head), as a fraction of the matrices it factors; never exceeded
    assert main(["compress", str(root / "m"), "--output_dir", str(root / "b"), "--budget", "0.5",
                 "--rank", "2", "--calibration_file", calib, "--calibration_samples", "8"]) == 0
    report = json.loads((root / "b" / "compression_report.json").read_text())
    factored = [m for m in report["modules"] if m["rank"] > 0]  # the untied head is listed, dense
    assert report["budget"] == int(0.5 * sum(m["params_before"] for m in factored))
    assert sum(m["params_after"] for m in factored) <= report["budget"]
    assert "Budget for the targeted matrices" in capsys.readouterr().out


@pytest.mark.parametrize("flags,match", [
    (["--init", "activation"], "needs --calibration_file"),
    (["--calibration_file", "missing.txt"], "does not exist"),
    (["--calibration_file", "CALIB", "--init", "svd"], "--init activation only"),
])
def test_compress_refuses_inconsistent_calibration_flags(gpt2_with_tokenizer, flags, match, capsys):
    root = gpt2_with_tokenizer
    flags = [str(root / "calib.txt") if f == "CALIB" else f for f in flags]
    assert main(["compress", str(root / "m"), "--output_dir", str(root / "x"), "--fraction", "0.25", *flags]) == 2
    assert match in capsys.readouterr().err
