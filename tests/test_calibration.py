"""Activation-aware Kronecker init (closed form, ALS), streamed calibration statistics and the
global parameter budget: checked against exact optima, exhaustive search and dense references."""

import itertools
import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from kn_transformers import KroneckerConfig, kroneckerize
from kn_transformers.core.budget import Candidate, matrix_candidates, solve_budget
from kn_transformers.core.calibration import calibration_batches, collect_statistics
from kn_transformers.core.kronecker_math import _rearrange, kronecker_to_dense, nearest_kronecker
from kn_transformers.core.report import count_parameters
from kn_transformers.core.weighted_kronecker import (
    kronecker_whitened,
    row_weighted_nearest_kronecker,
    weighted_error,
    weighted_nearest_kronecker,
)


def _covariance(n, tokens, seed, scale=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64)
    if scale is not None:
        X = X * scale[:, None]
    return X @ X.T / tokens


@pytest.mark.parametrize("rank", [1, 2])
def test_closed_form_is_the_exact_optimum_when_the_covariance_is_kronecker(rank):
    m1, n1, m2, n2 = 4, 6, 5, 3
    g = torch.Generator().manual_seed(rank)
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    C1 = _covariance(n1, 40, 1, torch.linspace(0.2, 3.0, n1, dtype=torch.float64))
    C2 = _covariance(n2, 30, 2)
    C = torch.kron(C1, C2)
    A, B = kronecker_whitened(W, (m1, n1), rank, C)
    achieved = weighted_error(W, A, B, C)
    # the optimum, computed another way: whiten by the full Cholesky factor of C and truncate the SVD
    L = torch.linalg.cholesky(C)
    s2 = torch.linalg.svdvals(_rearrange(W @ L, m1, n1, m2, n2)) ** 2
    optimum = float(s2[rank:].sum() / s2.sum())
    assert achieved == pytest.approx(optimum, rel=1e-8, abs=1e-12)
    # and ALS from the plain SVD, a different algorithm, converges to the same value
    _, _, fit = weighted_nearest_kronecker(W, (m1, n1), rank, C, damping=0.0, start="svd", max_iter=3000, tol=1e-15)
    assert fit.start == "svd" and fit.error == pytest.approx(optimum, rel=1e-8)
    plain = weighted_error(W, *nearest_kronecker(W, (m1, n1), rank), C)
    assert plain > optimum * 1.05  # the data make the weighting matter


@pytest.mark.parametrize("a_shape", [(12, 1), (1, 10)])
def test_outer_product_split_is_the_whitened_low_rank_optimum_on_general_data(a_shape):
    # A m×1 ⊗ B 1×n (or A 1×n ⊗ B m×1) is a rank-r matrix U·V: the whitened closed form is exact
    # for any covariance (Eckart–Young on W·L), which is what the budget relies on for its low-rank splits
    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    C = _covariance(10, 25, 3, torch.linspace(0.1, 4.0, 10, dtype=torch.float64))
    for rank in (1, 3):
        A, B, fit = weighted_nearest_kronecker(W, a_shape, rank, C, damping=0.0)
        s2 = torch.linalg.svdvals(W @ torch.linalg.cholesky(C)) ** 2
        optimum = float(s2[rank:].sum() / s2.sum())
        assert fit.start == "whitened" and weighted_error(W, A, B, C) == pytest.approx(optimum, rel=1e-8)
        assert weighted_error(W, *nearest_kronecker(W, a_shape, rank), C) > optimum * 1.05


@pytest.mark.parametrize("seed,shape,a_shape,rank", [(0, (12, 18), (3, 6), 1), (1, (12, 18), (4, 3), 2),
                                                     (2, (16, 16), (4, 4), 3), (3, (20, 8), (10, 2), 1)])
def test_als_never_does_worse_than_the_plain_svd_on_general_data(seed, shape, a_shape, rank):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    scale = torch.rand(shape[1], generator=g, dtype=torch.float64) * 3
    for tokens in (shape[1] // 2, 5 * shape[1]):  # rank-deficient and full-rank statistics
        C = _covariance(shape[1], tokens, seed + 10, scale)
        A0, B0 = nearest_kronecker(W, a_shape, rank)
        for damping in (0.0, 0.01):
            if damping == 0.0 and tokens < shape[1]:
                continue
            A, B, fit = weighted_nearest_kronecker(W, a_shape, rank, C, damping=damping)
            Cd = C + damping * C.diagonal().mean() * torch.eye(shape[1], dtype=C.dtype)
            assert weighted_error(W, A, B, Cd) <= weighted_error(W, A0, B0, Cd) * (1 + 1e-12)
            assert fit.error <= fit.start_error * (1 + 1e-12)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_row_weighting_is_the_exact_optimum_for_the_papers_embedding_split():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 8, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 50, (30,), generator=g).double()
    A, B = row_weighted_nearest_kronecker(W, (30, 4), 1, counts, damping=0.0)
    w = counts[:, None]
    err = lambda A, B: float((w * (W - kronecker_to_dense(A, B)) ** 2).sum())  # noqa: E731
    # optimum another way: the weighted problem is an SVD of the row-scaled rearrangement
    s2 = torch.linalg.svdvals(_rearrange(W * w.sqrt(), 30, 4, 1, 2)) ** 2
    assert err(A, B) == pytest.approx(float(s2[1:].sum()), rel=1e-9)
    assert err(A, B) < err(*nearest_kronecker(W, (30, 4), 1))


# ---------------------------------------------------------------------------- statistics


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)).eval()


def test_statistics_stream_exactly_and_leave_padding_out():
    model = _tiny_bert()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense", "bert.embeddings.word_embeddings"]
    targets = {n: model.get_submodule(n) for n in names}
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7]
    ids = torch.randint(1, 64, (4, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    padded = collect_statistics(model, targets, [{"input_ids": ids * mask, "attention_mask": mask}])
    # the same sequences one at a time, without padding, streamed in four batches
    single = collect_statistics(model, targets, [{"input_ids": ids[i:i + 1, :n]} for i, n in enumerate(lengths)])
    for name in names:
        assert padded[name].count == single[name].count == sum(lengths)
        torch.testing.assert_close(padded[name].sum_xx, single[name].sum_xx, rtol=1e-5, atol=1e-8)
    # bounded memory: one (n, n) float64 accumulator per linear, one count per token of the vocabulary
    assert padded[names[0]].sum_xx.shape == (32, 32) and padded[names[1]].sum_xx.shape == (64, 64)
    assert padded[names[2]].sum_xx.shape == (64,) and padded[names[2]].sum_xx.dtype == torch.float64
    assert padded[names[2]].sum_xx[0] == 0  # the padding id never counted


def test_calibration_batches_takes_ids_dicts_and_iterables_and_caps_samples():
    ids = torch.randint(0, 10, (20, 6))
    assert sum(b["input_ids"].shape[0] for b in calibration_batches(ids, 13)) == 13
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert all(set(b) == {"input_ids", "attention_mask"} for b in calibration_batches(enc))
    assert sum(b["input_ids"].shape[0] for b in calibration_batches([ids[:4], {"input_ids": ids[4:9]}], 7)) == 7
    with pytest.raises(ValueError, match="token ids"):
        calibration_batches([torch.randn(2, 3).tolist()])
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([])


# ---------------------------------------------------------------------------- kroneckerize


def _output_errors(student, teacher, batch):
    """Relative error of each Kronecker layer's output against the teacher's layer, both on the
    teacher's inputs of that layer for ``batch``."""
    inputs, handles = {}, []
    names = [r.name for r in student.compression_report.modules]
    for n in names:
        handles.append(teacher.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        teacher(**batch)
        for h in handles:
            h.remove()
        mask = batch["attention_mask"].bool()
        errs = []
        for n in names:
            t = teacher.get_submodule(n)(inputs[n])[mask]
            s = student.get_submodule(n)(inputs[n])[mask]
            errs.append(float((s - t).norm() / t.norm()))
    return errs


def test_activation_init_lowers_output_error_on_held_out_text_of_the_real_teacher(minilm_path, shared_data):
    teacher = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [json.loads(line)["sentence"] for line in open(shared_data / "glue" / "sst2" / "train.jsonl")][:96]
    calib = tok(rows[:64], padding=True, truncation=True, max_length=48, return_tensors="pt")
    held_out = tok(rows[64:], padding=True, truncation=True, max_length=48, return_tensors="pt")
    config = dict(target_modules=["encoder.layer.1.attention.self.query", "encoder.layer.1.intermediate.dense",
                                  "encoder.layer.1.attention.output.dense"], fraction=0.25)
    plain = kroneckerize(teacher, KroneckerConfig(**config), progress=False)
    aware = kroneckerize(teacher, KroneckerConfig(init="activation", **config), calibration_data=calib, progress=False)
    e_plain, e_aware = _output_errors(plain, teacher, held_out), _output_errors(aware, teacher, held_out)
    for p, a in zip(e_plain, e_aware):
        assert a < 0.85 * p  # text not used for calibration
    rows_ = aware.compression_report.modules
    assert all(r.init == "activation" and r.output_error is not None for r in rows_)
    assert "output error" in aware.compression_report.to_markdown()
    # deterministic
    again = kroneckerize(teacher, KroneckerConfig(init="activation", **config), calibration_data=calib, progress=False)
    for (k, v), (k2, v2) in zip(aware.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_activation_init_round_trips_and_sequential_calibrates_on_the_compressed_blocks(tmp_path):
    teacher = _tiny_bert()
    ids = torch.randint(1, 64, (24, 10), generator=torch.Generator().manual_seed(1))
    config = KroneckerConfig(fraction=0.25, init="activation", sequential=True, embedding=True)
    student = kroneckerize(teacher, config, calibration_data=ids, progress=False)
    student.save_pretrained(tmp_path)
    loaded = type(teacher).from_pretrained(tmp_path).eval()
    x = ids[:3]
    torch.testing.assert_close(loaded(x).logits, student(x).logits, rtol=1e-5, atol=1e-6)
    assert loaded.config.quantization_config.sequential is True
    # without the embedding, block 0 is calibrated on the teacher's own inputs: the same factors as
    # the non-sequential init; block 1 sees block 0's compressed outputs
    student = kroneckerize(teacher, KroneckerConfig(fraction=0.25, init="activation", sequential=True),
                           calibration_data=ids, progress=False)
    report = {r.name: r for r in student.compression_report.modules}
    flat = kroneckerize(teacher, KroneckerConfig(fraction=0.25, init="activation"), calibration_data=ids, progress=False)
    name0, name1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"
    torch.testing.assert_close(student.get_submodule(name0).A, flat.get_submodule(name0).A)
    assert not torch.allclose(student.get_submodule(name1).A, flat.get_submodule(name1).A)
    assert report[name1].output_error is not None


@pytest.mark.parametrize("kwargs,data,match", [
    (dict(fraction=0.25, init="activation"), None, "needs calibration_data"),
    (dict(fraction=0.25), "ids", "init='activation' only"),
])
def test_calibration_data_and_init_must_agree(kwargs, data, match):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=match):
        kroneckerize(_tiny_bert(), KroneckerConfig(**kwargs), calibration_data=ids if data else None, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction=0.25, budget=0.1), "exactly one of"),
    (dict(budget=1.5), "budget must be"),
    (dict(budget=0), "budget must be"),
    (dict(budget=True), "budget must be"),
    (dict(budget=0.2, rank_pattern={"query": 2}), "leave shape_pattern/rank_pattern out"),
    (dict(fraction=0.2, init="activation", normalize=True), "use one of them"),
    (dict(fraction=0.2, sequential=True), "needs init='activation'"),
    (dict(fraction=0.2, damping=-1.0), "damping must be"),
])
def test_config_refuses_bad_init_and_budget_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KroneckerConfig(**kwargs)


# ---------------------------------------------------------------------------- budget


def _exact(candidates, budget):
    """Multiple-choice knapsack by dynamic programming over parameter counts (small instances)."""
    best = {0: (0.0, {})}
    for name, cands in candidates.items():
        nxt = {}
        for used, (err, pick) in best.items():
            for c in cands:
                u = used + c.params
                if u <= budget and (u not in nxt or err + c.error < nxt[u][0]):
                    nxt[u] = (err + c.error, {**pick, name: c})
        best = nxt
    return min(best.values(), key=lambda v: v[0])


def test_budget_solver_is_within_a_few_percent_of_the_exact_solver():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 12), (6, 6), (12, 4), (9, 6)]
    worst = 0.0
    for trial in range(3):
        candidates = {}
        for i, (m, n) in enumerate(shapes):
            # decaying spectra, as trained weights have
            U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
            V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            k = min(m, n)
            S = torch.exp(-torch.arange(k, dtype=torch.float64) * (0.2 + 0.3 * trial))
            W = U[:, :k] @ torch.diag(S) @ V[:, :k].T
            candidates[f"m{i}"] = matrix_candidates(W, max_rank=3)
        smallest = sum(min(c.params for c in cs) for cs in candidates.values())
        largest = sum(max(c.params for c in cs) for cs in candidates.values())
        for frac in (0.1, 0.3, 0.6):
            budget = int(smallest + frac * (largest - smallest))
            exact, _ = _exact(candidates, budget)
            at_full = solve_budget(candidates, budget)  # budget below the resolution: exact
            assert sum(c.error for c in at_full.values()) == pytest.approx(exact, rel=1e-12)
            coarse = solve_budget(candidates, budget, resolution=64)  # units of several parameters, as on real models
            assert sum(c.params for c in coarse.values()) <= budget
            found = sum(c.error for c in coarse.values())
            assert found >= exact - 1e-12
            worst = max(worst, (found - exact) / max(exact, 1e-12))
    assert worst <= 0.05, worst


def test_budget_refuses_what_cannot_fit():
    cands = {"a": [Candidate((2, 2), 1, 10, 0.5)], "b": [Candidate((2, 2), 1, 10, 0.5)]}
    with pytest.raises(ValueError, match="below the smallest"):
        solve_budget(cands, 15)


@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_kroneckerize_budget_fraction_is_never_exceeded_and_spends_where_it_helps(budget):
    teacher = _tiny_bert()
    student = kroneckerize(teacher, KroneckerConfig(budget=budget, rank=3), progress=False)
    report = student.compression_report
    dense = sum(r.params_before for r in report.modules)
    used = sum(r.params_after for r in report.modules)
    assert used <= report.budget == int(budget * dense)
    assert used >= 0.9 * report.budget  # the greedy spends the budget
    assert "Budget for the targeted matrices" in report.to_markdown()
    # against the uniform split at the same size, the summed squared error is no larger
    uniform = kroneckerize(teacher, KroneckerConfig(fraction=used / dense), progress=False).compression_report
    if sum(r.params_after for r in uniform.modules) <= used:
        assert sum(r.rel_error ** 2 for r in report.modules) <= sum(r.rel_error ** 2 for r in uniform.modules) * 1.02


def test_kroneckerize_int_budget_is_the_whole_model_and_round_trips(tmp_path):
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=16)).eval()
    ids = torch.randint(0, 60, (12, 8), generator=torch.Generator().manual_seed(0))
    budget = count_parameters(teacher) // 2
    config = KroneckerConfig(budget=budget, rank=2, embedding=True, init="activation")
    student = kroneckerize(teacher, config, calibration_data=ids, progress=False)
    assert count_parameters(student) <= budget
    student.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids[:2]).logits, student(ids[:2]).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="below what stays dense"):
        kroneckerize(teacher, KroneckerConfig(budget=1000, embedding=True), progress=False)


# ---------------------------------------------------------------------------- paper converters


def test_paper_converters_take_activation_init_and_a_budget():
    from kn_transformers import kngpt2_from_gpt2, kronecker_bert_from_bert
    from kn_transformers.core.weighted_kronecker import damped

    teacher = _tiny_bert()
    ids = torch.randint(1, 64, (24, 10), generator=torch.Generator().manual_seed(2))
    plain = kronecker_bert_from_bert(teacher, preset="kroneckerbert8", progress=False)
    aware = kronecker_bert_from_bert(teacher, preset="kroneckerbert8", init="activation", calibration_data=ids,
                                     progress=False)
    assert all(r.init == "activation" and r.output_error is not None for r in aware.compression_report.modules)
    # per matrix, on the calibration inputs (damped as the fit is), never worse than the paper's SVD
    names = [n for n in aware.config.kronecker_factors if "embeddings" not in n]
    stats = collect_statistics(teacher, {n: teacher.bert.get_submodule(n) for n in names}, [{"input_ids": ids}])
    better = 0
    for n in names:
        C = damped(stats[n].covariance, 0.01)
        W = teacher.bert.get_submodule(n).weight
        e_aware = weighted_error(W, aware.bert.get_submodule(n).A, aware.bert.get_submodule(n).B, C)
        e_plain = weighted_error(W, plain.bert.get_submodule(n).A, plain.bert.get_submodule(n).B, C)
        assert e_aware <= e_plain * (1 + 1e-9), n
        better += e_aware < 0.99 * e_plain
    assert better >= len(names) // 2
    # a global budget through the converter: never exceeded, reported
    budgeted = kronecker_bert_from_bert(teacher, preset="kroneckerbert8", budget=0.3, rank=2, init="activation",
                                        calibration_data=ids, progress=False)
    report = budgeted.compression_report
    assert sum(r.params_after for r in report.modules) <= report.budget == int(
        0.3 * sum(r.params_before for r in report.modules))
    # the GPT-2 converter: the same options
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=16)).eval()
    gids = torch.randint(0, 60, (12, 8), generator=torch.Generator().manual_seed(3))
    kn = kngpt2_from_gpt2(gpt2, preset="paper", init="activation", calibration_data=gids, progress=False)
    assert {r.init for r in kn.compression_report.modules if r.rank > 0} == {"activation"}
    with torch.no_grad():
        assert torch.isfinite(kn(gids[:2]).logits).all()
    # with a budget, rank is the planner's ceiling: above what the presets' splits hold (factor 2: 2,
    # kroneckerbert8's 2x2 B: 4), the preset only selects the matrices
    kn = kngpt2_from_gpt2(gpt2, preset="paper", budget=0.5, rank=8, init="activation", calibration_data=gids,
                          progress=False)
    report = kn.compression_report  # (it also lists the paper's untouched even layers, rank 0)
    assert sum(r.params_after for r in report.modules if r.rank > 0) <= report.budget
    assert max(r.rank for r in report.modules) > 2
    wide = kronecker_bert_from_bert(teacher, preset="kroneckerbert8", budget=0.3, rank=8, init="activation",
                                    calibration_data=ids, progress=False)
    assert sum(r.params_after for r in wide.compression_report.modules) <= wide.compression_report.budget
