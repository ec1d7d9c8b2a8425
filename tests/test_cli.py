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
