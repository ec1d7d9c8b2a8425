"""The recipes end to end on tiny models and the real offline data, plus the real MiniLM on RTE."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

import kn_transformers  # noqa: F401
import kn_transformers.recipes.distill_lm
import kn_transformers.recipes.evaluate_perplexity
import kn_transformers.recipes.run_glue
from kn_transformers.cli import main as cli
from kn_transformers.hub import check_upload_folder

COMMON = ["--do_train", "--do_eval", "--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "16", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A tiny random BERT classifier with the real MiniLM (uncased WordPiece) tokenizer."""

    def make(num_labels):
        path = tmp_path_factory.mktemp(f"tinybert{num_labels}")
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
        BertForSequenceClassification(cfg).save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
        return str(path)

    return make


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("tinygpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(shared_data / "gpt2-tokenizer").save_pretrained(path)
    return str(path)


def glue_files(shared_data, task):
    return ["--train_file", str(shared_data / "glue" / task / "train.jsonl"),
            "--validation_file", str(shared_data / "glue" / task / "validation.jsonl")]


def test_run_glue_pair_task_with_ilkd_writes_results_card_and_uploadable_folder(tmp_path, tiny_bert, shared_data):
    teacher = tiny_bert(2)
    out = tmp_path / "rte"
    cli(["glue", "--model_name_or_path", teacher, "--preset", "kroneckerbert8", "--teacher_model_name_or_path",
         teacher, "--distill_preset", "kroneckerbert", "--task_name", "rte", *glue_files(shared_data, "rte"),
         "--max_train_samples", "48", "--max_eval_samples", "32", "--max_steps", "3", "--max_seq_length", "64",
         "--output_dir", str(out), *COMMON])
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_loss_ffn", "eval_loss_attention"} <= results.keys()
    # with a teacher, the student was converted with the activation-aware init (--init auto)
    assert "activation-aware init on 128 training rows" in (out / "README.md").read_text()
    assert results["eval_samples"] == 32
    # the card parses back and its model-index matches eval_results.json
    card = ModelCard.load(out / "README.md")
    (res,) = card.data.eval_results
    assert (res.metric_type, res.dataset_config, res.dataset_type) == ("accuracy", "rte", "nyu-mll/glue")
    assert res.metric_value == pytest.approx(results["eval_accuracy"])
    # the card carries the per-module compression table
    assert "encoder.layer.1.intermediate.dense" in card.text and "rel. error" in card.text
    # the folder that --push_to_hub would upload is complete ...
    files = check_upload_folder(str(out))
    assert {"modeling_kronecker_bert.py", "configuration_kronecker_bert.py", "layers.py"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_kronecker_bert.")
    # ... and loads on its own, in a Python where kn_transformers cannot be imported
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "kn_transformers" or name.startswith("kn_transformers."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        x = tok(["a premise", "and a hypothesis"], return_tensors="pt", padding=True)
        print(type(m).__name__, m(**x).logits.shape[-1])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["KroneckerBertForSequenceClassification", "2"]


def test_check_upload_folder_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kngpt2", "auto_map": {
        "AutoModelForCausalLM": "modeling_kngpt2.KnGPT2LMHeadModel"}}))
    with pytest.raises(ValueError, match=r"missing README.md, \*.safetensors weights, modeling_kngpt2.py"):
        check_upload_folder(str(tmp_path))


def test_run_glue_regression_stsb_style(tmp_path, tiny_bert, shared_data):
    # STS-B-style pairs with float scores in [0, 5], built from RTE sentences (real text)
    rows = [json.loads(line) for line in open(shared_data / "glue" / "rte" / "train.jsonl")][:64]
    for split, part in (("train", rows[:48]), ("validation", rows[48:])):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i, r in enumerate(part):
                f.write(json.dumps({"sentence1": r["sentence1"], "sentence2": r["sentence2"],
                                    "label": (i * 7 % 11) / 2.0, "idx": i}) + "\n")
    teacher = tiny_bert(1)
    out = tmp_path / "stsb"
    metrics = kn_transformers.recipes.run_glue.main(
        ["--model_name_or_path", teacher, "--preset", "kroneckerbert21", "--teacher_model_name_or_path", teacher,
         "--task_name", "stsb", "--train_file", str(tmp_path / "train.jsonl"), "--validation_file",
         str(tmp_path / "validation.jsonl"), "--max_steps", "3", "--max_seq_length", "64", "--output_dir", str(out),
         "--train_sampling_strategy", "group_by_length", *COMMON])  # as the README's glue command
    assert {"eval_pearson", "eval_spearmanr", "eval_loss_logits"} <= metrics.keys()
    # no --distill_preset: the recommended recipe (balanced terms without the embedding term, masked copies)
    assert {"eval_loss_hidden", "eval_loss_attention"} <= metrics.keys() and "eval_loss_embedding" not in metrics
    assert "preset `recommended`, mask augmentation 0.25" in (out / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    types = {r.metric_type for r in ModelCard.load(out / "README.md").data.eval_results}
    assert types == {"pearsonr", "spearmanr"}


def test_run_glue_gpt2_student_on_sst2_labels_only(tmp_path, tiny_gpt2, shared_data):
    out = tmp_path / "sst2"
    metrics = kn_transformers.recipes.run_glue.main(
        ["--model_name_or_path", tiny_gpt2, "--preset", "paper", "--task_name", "sst2",
         *glue_files(shared_data, "sst2"), "--max_train_samples", "32", "--max_eval_samples", "32",
         "--max_steps", "2", "--max_seq_length", "32", "--output_dir", str(out), *COMMON])
    assert "eval_accuracy" in metrics and "eval_loss_hidden" not in metrics  # no teacher: plain Trainer
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "KnGPT2ForSequenceClassification"
    # the GPT-2 student calibrated on training rows; bad --init values are one line
    metrics = kn_transformers.recipes.run_glue.main(
        ["--model_name_or_path", tiny_gpt2, "--preset", "paper", "--init", "activation", "--calibration_samples", "8",
         "--task_name", "sst2", *glue_files(shared_data, "sst2"), "--max_train_samples", "32", "--max_eval_samples",
         "32", "--max_steps", "2", "--max_seq_length", "32", "--output_dir", str(tmp_path / "act"), *COMMON])
    assert "eval_accuracy" in metrics
    for extra, match in ((["--init", "nearest"], "--init must be one of 'auto', 'svd', 'activation'"),
                         (["--init", "activation", "--do_train", "false"], "add --do_train")):
        with pytest.raises(ValueError, match=match):
            kn_transformers.recipes.run_glue.main(
                ["--model_name_or_path", tiny_gpt2, "--preset", "paper", "--task_name", "sst2",
                 *glue_files(shared_data, "sst2"), "--output_dir", str(tmp_path / "bad"), *COMMON, *extra])


def test_distill_lm_and_evaluate_perplexity(tmp_path, tiny_gpt2, shared_data):
    text = (shared_data / "wikitext-2" / "valid.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(text[:300]))
    (tmp_path / "valid.txt").write_text("\n".join(text[300:360]))
    out = tmp_path / "kngpt2"
    metrics = kn_transformers.recipes.distill_lm.main(
        ["--teacher_model_name_or_path", tiny_gpt2, "--preset", "paper", "--train_file", str(tmp_path / "train.txt"),
         "--validation_file", str(tmp_path / "valid.txt"), "--block_size", "64", "--max_train_tokens", "2048",
         "--max_steps", "3", "--distill_preset", "kngpt2", "--output_dir", str(out), *COMMON])
    assert metrics["eval_perplexity"] > 1 and metrics["eval_perplexity_tokens"] > 100
    assert {"eval_loss_hidden", "eval_loss_attention"} <= metrics.keys()
    student = AutoModelForCausalLM.from_pretrained(out)
    assert type(student).__name__ == "KnGPT2LMHeadModel"
    result = kn_transformers.recipes.evaluate_perplexity.main(
        ["--model_name_or_path", str(out), "--text_file", str(tmp_path / "valid.txt"), "--max_length", "64",
         "--stride", "64", "--output_file", str(tmp_path / "ppl.json")])
    assert json.loads((tmp_path / "ppl.json").read_text())["tokens"] == result["tokens"]
    # reference: non-overlapping 64-token windows through the model's own LM loss
    ids = AutoTokenizer.from_pretrained(out)((tmp_path / "valid.txt").read_text(), return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), 64):
            window = ids[b:b + 64][None]
            if window.shape[1] > 1:
                nll += student(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
                count += window.shape[1] - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-4)
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_type == "perplexity"


def test_compress_command_writes_a_loadable_student(tmp_path, tiny_bert, capsys):
    teacher = tiny_bert(2)
    out = tmp_path / "student"
    assert cli(["compress", teacher, "--preset", "kroneckerbert8", "--output_dir", str(out)]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["compression"] > 5
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(student).__name__ == "KroneckerBertForSequenceClassification"
    assert AutoTokenizer.from_pretrained(out) is not None
    capsys.readouterr()
    assert cli(["compress", teacher, "--preset", "paper", "--output_dir", str(tmp_path / "x")]) == 2
    assert "kn-transformers: error: preset 'paper' is not for bert teachers" in capsys.readouterr().err


@pytest.mark.integration
def test_run_glue_on_the_real_minilm_teacher_rte(tmp_path, minilm_path, shared_data):
    """The real pretrained MiniLM, fine-tuned on RTE with a small budget, then its kroneckerbert8 student."""
    teacher_dir = tmp_path / "teacher"
    t_metrics = kn_transformers.recipes.run_glue.main(
        ["--model_name_or_path", minilm_path, "--task_name", "rte", *glue_files(shared_data, "rte"),
         "--max_train_samples", "256", "--max_steps", "16", "--learning_rate", "5e-5", "--max_seq_length", "128",
         "--output_dir", str(teacher_dir), *COMMON])
    s_metrics = kn_transformers.recipes.run_glue.main(
        ["--model_name_or_path", str(teacher_dir), "--preset", "kroneckerbert8", "--teacher_model_name_or_path",
         str(teacher_dir), "--distill_preset", "balanced_augmented", "--init", "activation", "--calibration_samples",
         "64", "--task_name", "rte", *glue_files(shared_data, "rte"),
         "--max_train_samples", "256", "--max_steps", "16", "--learning_rate", "5e-4", "--max_seq_length", "128",
         "--output_dir", str(tmp_path / "student"), *COMMON])
    # balanced terms and masked copies through the real tokenizer; the card names the recipe
    assert {"eval_loss_hidden", "eval_loss_attention", "eval_loss_logits"} <= s_metrics.keys()
    card = (tmp_path / "student" / "README.md").read_text()
    assert "preset `balanced_augmented`, mask augmentation 0.25" in card
    assert "output error" in card  # activation-aware init on 64 training rows: the card's table says so
    for m in (t_metrics, s_metrics):
        assert m["eval_samples"] == 277 and 0.3 < m["eval_accuracy"] < 0.8  # RTE dev: 277 pairs, 2 classes
    print(f"\nRTE dev accuracy: teacher {t_metrics['eval_accuracy']:.4f}, "
          f"kroneckerbert8 + ILKD {s_metrics['eval_accuracy']:.4f}")


def test_distill_lm_masked_lm_stage_one_for_bert(tmp_path, minilm_path, shared_data):
    """KroneckerBERT stage 1 on masked-LM batches: a BERT teacher with an MLM head."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    teacher = tmp_path / "bert-mlm"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(teacher)
    text = (shared_data / "wikitext-2" / "valid.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(text[:200]))
    (tmp_path / "valid.txt").write_text("\n".join(text[200:240]))
    out = tmp_path / "kb8"
    metrics = kn_transformers.recipes.distill_lm.main(
        ["--teacher_model_name_or_path", str(teacher), "--preset", "kroneckerbert8", "--train_file",
         str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"), "--block_size", "64",
         "--max_steps", "2", "--distill_preset", "kroneckerbert", "--init", "activation", "--calibration_samples", "4",
         "--output_dir", str(out), *COMMON])
    # the student was calibrated on 4 training blocks: its card's table has the output errors
    assert "output error" in (out / "README.md").read_text()
    # masked positions only carry labels: the MLM loss exists, and with it an MLM perplexity
    assert {"eval_loss_labels", "eval_loss_logits", "eval_loss_ffn", "eval_mlm_perplexity"} <= metrics.keys()
    from transformers import AutoModelForMaskedLM

    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "KroneckerBertForMaskedLM"


def test_evaluate_glue_command_writes_eval_results(tmp_path, tiny_bert, shared_data):
    teacher = tiny_bert(2)
    out = tmp_path / "eval"
    cli(["evaluate", "glue", "--model_name_or_path", teacher, "--task_name", "rte",
         *glue_files(shared_data, "rte"), "--max_eval_samples", "16", "--max_seq_length", "64",
         "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 16 and 0 <= results["eval_accuracy"] <= 1
    assert not (out / "model.safetensors").exists()  # evaluation only: nothing trained, nothing saved
