"""Bad input is refused with a one-line error naming what is wrong, never silently misread."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kn_transformers import DistillationArguments, ILKDTrainer
from kn_transformers.cli import decomposition_report, main
from kn_transformers.models.kronecker_bert.convert_bert import kronecker_bert_config, kronecker_bert_from_bert
from kn_transformers.models.kngpt2.convert_gpt2 import kngpt2_config_from_gpt2, kngpt2_from_gpt2
from kn_transformers.distillation import parse_layer_map
from kn_transformers.models.loading import check_model_name_or_path
from kn_transformers.recipes.students import load_model, model_family

sys.path.insert(0, str(Path(__file__).parent))
from ilkd_run import lm_dataset, tiny_pair  # noqa: E402

GPT2 = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)
BERT = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
NOT_INDICES = ["11", "1", [0.5], [1.0], [True], [np.bool_(True)], ["1"], [None], 1.5]


def _one_line(message: str) -> bool:
    return "\n" not in message.strip()


# ----------------------------------------------------------------------------- 1. layers


@pytest.mark.parametrize("layers", NOT_INDICES, ids=repr)
def test_gpt2_layers_must_be_integers(layers):
    with pytest.raises(ValueError, match="layer") as exc:
        kngpt2_config_from_gpt2(GPT2, preset="paper", layers=layers)
    assert _one_line(str(exc.value)) and "0..1" in str(exc.value)


@pytest.mark.parametrize("layers", NOT_INDICES, ids=repr)
def test_bert_layers_must_be_integers(layers):
    with pytest.raises(ValueError, match="layer") as exc:
        kronecker_bert_config(BERT, "kroneckerbert8", layers=layers)
    assert _one_line(str(exc.value)) and "0..1" in str(exc.value)


@pytest.mark.parametrize("layers", [[-1], [2], [0, 7]], ids=repr)
def test_layers_out_of_range(layers):
    with pytest.raises(ValueError, match=r"out of range for a teacher with n_layer=2 \(valid: 0..1\)"):
        kngpt2_config_from_gpt2(GPT2, preset="paper", layers=layers)
    with pytest.raises(ValueError, match=r"out of range for a teacher with num_hidden_layers=2 \(valid: 0..1\)"):
        kronecker_bert_config(BERT, "kroneckerbert8", layers=layers)


def test_integer_layers_still_work_including_numpy_and_a_single_int():
    torch.manual_seed(0)
    student = kngpt2_from_gpt2(GPT2LMHeadModel(GPT2), layers=[np.int64(1)], progress=False)
    layer_keys = [n for n in student.config.kronecker_factors if n != "wte"]
    assert layer_keys == [f"h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    cfg = kronecker_bert_config(BERT, "kroneckerbert8", layers=1)
    assert not any(k.startswith("encoder.layer.0.") for k in cfg.kronecker_factors)
    assert any(k.startswith("encoder.layer.1.") for k in cfg.kronecker_factors)


# ----------------------------------------------------------------------------- 2. non-finite settings and losses

WEIGHTS = ["embedding_weight", "hidden_weight", "attention_weight", "ffn_weight", "logits_weight", "labels_weight"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0], ids=str)
@pytest.mark.parametrize("name", WEIGHTS + ["temperature"])
def test_non_finite_or_negative_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number") as exc:
        DistillationArguments(output_dir="x", report_to=[], **{name: value})
    assert _one_line(str(exc.value))


def test_zero_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DistillationArguments(output_dir="x", report_to=[], temperature=0.0)


def _trainer(tmp_path, teacher, student, **overrides):
    settings = dict(per_device_train_batch_size=8, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                    disable_tqdm=True, save_strategy="no", distill_preset="kngpt2")
    args = DistillationArguments(output_dir=str(tmp_path), **{**settings, **overrides})
    return ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=lm_dataset(32))


def test_a_nan_teacher_stops_training_naming_the_terms(tmp_path):
    teacher, student = tiny_pair()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(math.nan)
    trainer = _trainer(tmp_path, teacher, student)
    with pytest.raises(FloatingPointError, match=r"ILKD loss term 'embedding' is nan at step 1 \(also non-finite: "
                                                 r"'hidden', 'attention', 'logits'\)"):
        trainer.train()
    # stopped before the optimiser step: the student is untouched, nothing reads 0.0
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert not [h for h in trainer.state.log_history if "loss" in h]


def test_a_single_non_finite_term_is_named(tmp_path):
    teacher, student = tiny_pair()
    with torch.no_grad():
        teacher.transformer.h[1].attn.c_attn.bias.fill_(math.nan)  # only layer 2's attention (and what follows)
    trainer = _trainer(tmp_path, teacher, student, embedding_weight=0.0, hidden_weight=0.0, logits_weight=0.0,
                       labels_weight=0.0)
    with pytest.raises(FloatingPointError, match=r"^ILKD loss term 'attention' is nan at step 1; "):
        trainer.train()


def test_an_overflowing_student_stops_training(tmp_path):
    teacher, student = tiny_pair()
    trainer = _trainer(tmp_path, teacher, student, learning_rate=1e38, max_steps=5, max_grad_norm=0.0)
    with pytest.raises(FloatingPointError, match=r"ILKD loss term '\w+' is (nan|inf|-inf) at step [2-5]"):
        trainer.train()


def test_a_batch_without_labels_is_not_an_error(tmp_path):
    """An all-ignored batch (e.g. MLM with nothing masked) gives a NaN label loss with zero gradients."""
    teacher, student = tiny_pair()
    ds = lm_dataset(32).map(lambda r: {"labels": [-100] * len(r["labels"])})
    args = DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=ds)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and h["loss"] > 0 and "loss_labels" not in h for h in logs)


# ----------------------------------------------------------------------------- 3. CLI numbers


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2") / "m"
    GPT2LMHeadModel(GPT2).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("flags", [["--fraction", "0"], ["--fraction", "nan"], ["--fraction", "inf"],
                                   ["--fraction", "5"], ["--fraction", "1"], ["--fraction", "x"], ["--rank", "-1"],
                                   ["--rank", "0"], ["--rank", "1.5"]], ids=" ".join)
def test_report_refuses_bad_numbers(tiny_gpt2_dir, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", tiny_gpt2_dir, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}: must be a" in err and repr(flags[1]) in err


def test_compress_refuses_a_bad_target_fraction(tmp_path, tiny_gpt2_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", tiny_gpt2_dir, "--output_dir", str(tmp_path / "s"), "--target_fraction", "0"])
    assert exc.value.code == 2 and "argument --target_fraction" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [dict(fraction=0.0), dict(fraction=math.nan), dict(fraction=2.0), dict(rank=0)])
def test_decomposition_report_refuses_bad_numbers(kwargs):
    kwargs = {"fraction": 0.25, **kwargs}
    with pytest.raises(ValueError, match="fraction|rank"):
        decomposition_report(torch.nn.Linear(8, 8), **kwargs)


# ----------------------------------------------------------------------------- 4. layer_map

BAD_LAYER_MAPS = ["[]", "[[1.5, 2]]", "[[true, 1]]", '[["1", "2"]]', '{"12": 1}', "[[1, 2, 3]]", "[1, 2]",
                  "[[0, 1]]", "[[1, -2]]", "every_other", "[[1, 2]", '"backwards"']


@pytest.mark.parametrize("layer_map", BAD_LAYER_MAPS)
def test_layer_map_is_validated_when_parsed(layer_map):
    with pytest.raises(ValueError, match=r"^layer_map must be 'one_to_one', 'uniform' or a non-empty JSON list") as exc:
        DistillationArguments(output_dir="x", report_to=[], layer_map=layer_map)
    assert _one_line(str(exc.value))


def test_layer_map_python_lists_are_checked_too():
    with pytest.raises(ValueError, match="non-empty JSON list"):
        parse_layer_map([], 2, 2)
    with pytest.raises(ValueError, match="non-empty JSON list"):
        parse_layer_map([(1, True)], 2, 2)
    assert parse_layer_map([(1, 2), [2, 2]], 2, 2) == [(1, 2), (2, 2)]


def test_layer_map_out_of_range_is_caught_at_trainer_setup(tmp_path):
    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match=r"layer_map pair \[1, 3\] is out of range: student layers are 1..2, "
                                         r"teacher layers 1..2"):
        _trainer(tmp_path, teacher, student, layer_map="[[1, 3]]")


# ----------------------------------------------------------------------------- 5. missing local paths


@pytest.mark.parametrize("path", ["./missing", "~/surely-missing-kn-model", "/nonexistent/model", "a/b/c",
                                  "with space", ""])
def test_missing_local_paths_are_named(path):
    with pytest.raises(FileNotFoundError, match="the folder does not exist; pass a local model folder") as exc:
        check_model_name_or_path(path, "teacher")
    assert str(exc.value).startswith(f"teacher {path!r}:") and _one_line(str(exc.value))


def test_hub_ids_and_existing_folders_pass(tmp_path, monkeypatch):
    for hub_id in ("gpt2", "openai-community/gpt2", "google-bert/bert-base-uncased"):
        assert check_model_name_or_path(hub_id) == hub_id
    assert check_model_name_or_path(tmp_path) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileNotFoundError, match="'out/student'"):  # its parent exists: a local path, mistyped
        check_model_name_or_path("out/student")


def test_every_loader_checks_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    for load in (lambda: kngpt2_from_gpt2(missing), lambda: kronecker_bert_from_bert(missing),
                 lambda: kngpt2_from_gpt2(Path(missing)), lambda: model_family(missing),
                 lambda: load_model(missing, "causal-lm")):
        with pytest.raises(FileNotFoundError, match="folder does not exist"):
            load()


def test_existing_teacher_folders_still_load(tmp_path, tiny_gpt2_dir):
    torch.manual_seed(0)
    BertModel(BERT).save_pretrained(tmp_path / "bert")
    assert kngpt2_from_gpt2(tiny_gpt2_dir, progress=False).config.model_type == "kngpt2"
    assert kronecker_bert_from_bert(tmp_path / "bert", progress=False).config.model_type == "kronecker-bert"


# ----------------------------------------------------------------------------- 6. CLI errors


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KN_TRANSFORMERS_DEBUG", raising=False)
    missing = str(tmp_path / "missing")
    assert main(["report", missing]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"kn-transformers: error: model {missing!r}: the folder does not exist")
    assert main(["compress", missing, "--output_dir", str(tmp_path / "s")]) == 2
    assert _error_line(capsys).startswith(f"kn-transformers: error: teacher {missing!r}: the folder does not exist")


def test_cli_reports_recipe_argument_errors_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KN_TRANSFORMERS_DEBUG", raising=False)
    argv = ["distill", "--teacher_model_name_or_path", "gpt2", "--output_dir", str(tmp_path), "--report_to", "none"]
    assert main([*argv, "--temperature", "nan"]) == 2
    assert _error_line(capsys) == "kn-transformers: error: temperature must be a finite number > 0, got nan"
    assert main([*argv, "--layer_map", "[]"]) == 2
    assert _error_line(capsys).startswith("kn-transformers: error: layer_map must be")


def test_cli_debug_re_raises(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing")
    monkeypatch.delenv("KN_TRANSFORMERS_DEBUG", raising=False)
    with pytest.raises(FileNotFoundError):
        main(["--debug", "report", missing])
    monkeypatch.setenv("KN_TRANSFORMERS_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["report", missing])


def test_console_command_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KN_TRANSFORMERS_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "kn_transformers", "report", str(tmp_path / "missing")],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kn-transformers: error: model "), proc.stderr
