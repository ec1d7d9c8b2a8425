import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, TrainerCallback

from kn_transformers import DistillationArguments, ILKDTrainer
from kn_transformers.distillation import (
    DEFAULT_PRESET,
    DISTILLATION_PRESETS,
    attention_kl,
    attention_score_mse,
    attention_valid_mask,
    hidden_mse,
    logits_kl,
    logits_mse,
    parse_layer_map,
)

sys.path.insert(0, str(Path(__file__).parent))
from ilkd_run import lm_dataset, run, tiny_pair  # noqa: E402

HERE = Path(__file__).parent

# ----------------------------------------------------------------------------- loss terms


def test_hidden_mse_by_hand_and_padding_never_counts():
    s = torch.randn(2, 3, 4)
    t = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    by_hand = sum(((s[b, i] - t[b, i]) ** 2).sum() for b, i in [(0, 0), (0, 1), (1, 0)]) / (3 * 4)
    assert hidden_mse(s, t, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)
    s2 = s.clone()
    s2[0, 2] += 100
    s2[1, 1:] -= 50  # padded positions
    assert hidden_mse(s2, t, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert hidden_mse(s, t).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_mse(s, t[..., :3])


def test_attention_valid_mask_padding_and_causal():
    am = torch.tensor([[0, 1, 1]])  # left padding
    v = attention_valid_mask(am, 3, causal=True)[0, 0]
    expected = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(v, expected)
    v = attention_valid_mask(torch.tensor([[1, 1, 0]]), 3, causal=False)[0, 0]
    assert torch.equal(v, torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool))


def test_attention_score_mse_by_hand_masked_pairs_never_count():
    s = torch.randn(1, 2, 3, 3)
    t = torch.randn(1, 2, 3, 3)
    valid = attention_valid_mask(torch.tensor([[1, 1, 0]]), 3, causal=True)
    pairs = [(0, 0), (1, 0), (1, 1)]
    by_hand = sum((s[0, h, q, k] - t[0, h, q, k]) ** 2 for h in range(2) for q, k in pairs) / (2 * len(pairs))
    assert attention_score_mse(s, t, valid).item() == pytest.approx(by_hand.item(), rel=1e-6)
    s2 = s.clone()
    s2[..., 0, 1] = -3e38  # a masked (future) pair holding the mask value
    s2[..., 2, :] = 7.0  # a padded query
    assert attention_score_mse(s2, t, valid).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_attention_kl_by_hand_with_causal_and_padding():
    torch.manual_seed(0)
    s = torch.randn(1, 1, 3, 3)
    t = torch.randn(1, 1, 3, 3)
    valid = attention_valid_mask(torch.tensor([[0, 1, 1]]), 3, causal=True)
    # valid rows: query 1 sees key 1; query 2 sees keys 1, 2
    kl_rows = []
    for q, keys in [(1, [1]), (2, [1, 2])]:
        p = torch.softmax(t[0, 0, q, keys], -1)
        r = torch.softmax(s[0, 0, q, keys], -1)
        kl_rows.append((p * (p.log() - r.log())).sum())
    by_hand = sum(kl_rows) / 2
    assert attention_kl(s, t, valid).item() == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-7)
    s2 = s.clone()
    s2[0, 0, 0] = 5.0  # the padded query row
    s2[0, 0, 1, 2] = 9.0  # a future key
    s2[0, 0, 2, 0] = -9.0  # a padded key
    assert attention_kl(s2, t, valid).item() == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-7)
    assert attention_kl(t, t, valid).item() == pytest.approx(0.0, abs=1e-7)


def test_logits_terms_by_hand():
    s = torch.randn(2, 3, 5)
    t = torch.randn(2, 3, 5)
    T = 2.0
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    p = torch.softmax(t / T, -1)
    kl = (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
    by_hand = (kl[0].sum() + kl[1, 0]) / 4 * T**2
    assert logits_kl(s, t, T, mask).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # classification: the mean over examples equals torch's batchmean KL
    ref = F.kl_div(torch.log_softmax(s[:, 0] / T, -1), torch.log_softmax(t[:, 0] / T, -1), log_target=True,
                   reduction="batchmean") * T**2
    assert logits_kl(s[:, 0], t[:, 0], T).item() == pytest.approx(ref.item(), rel=1e-5)
    assert logits_mse(s[:, 0, :1], t[:, 0, :1]).item() == pytest.approx(((s[:, 0, 0] - t[:, 0, 0]) ** 2).mean().item())
    with pytest.raises(ValueError, match="share the vocabulary"):
        logits_kl(s, t[..., :4])


def test_layer_maps():
    assert parse_layer_map("one_to_one", 3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert parse_layer_map("uniform", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert parse_layer_map("[[1, 2], [2, 6]]", 2, 6) == [(1, 2), (2, 6)]
    with pytest.raises(ValueError, match="needs equal depths.*use layer_map='uniform'"):
        parse_layer_map("one_to_one", 3, 6)
    with pytest.raises(ValueError, match="out of range"):
        parse_layer_map([[1, 7]], 2, 6)
    with pytest.raises(ValueError, match="JSON list"):
        parse_layer_map("every_other", 2, 6)


def test_arguments_presets_and_errors():
    a = DistillationArguments(output_dir="x", distill_preset="kroneckerbert", report_to=[])
    assert a.attention_loss == "mse_scores" and a.ffn_weight == 1.0 and a.hidden_weight == 0.0
    a = DistillationArguments(output_dir="x", distill_preset="kngpt2", hidden_weight=0.5, report_to=[])
    assert a.attention_loss == "kl" and a.hidden_weight == 0.5 and a.ffn_weight == 0.0
    with pytest.raises(ValueError, match="distill_preset 'tinybert' is unknown"):
        DistillationArguments(output_dir="x", distill_preset="tinybert", report_to=[])
    with pytest.raises(ValueError, match="attention_loss"):
        DistillationArguments(output_dir="x", attention_loss="cosine", report_to=[])
    # "balanced": relative feature errors, layer means, intermediate then task terms (two_phase); the papers'
    # presets (and no preset: kngpt2) keep their raw, summed terms
    a = DistillationArguments(output_dir="x", report_to=[], distill_preset="balanced")
    assert (a.feature_normalization, a.layer_reduction, a.intermediate_schedule, a.attention_loss) == (
        "teacher", "mean", "two_phase", "kl")
    assert DEFAULT_PRESET == "kngpt2" and DistillationArguments(output_dir="x", report_to=[]).hidden_weight == 1.0
    for preset in ("kngpt2", "kroneckerbert", None):
        a = DistillationArguments(output_dir="x", distill_preset=preset, report_to=[])
        assert (a.feature_normalization, a.layer_reduction, a.intermediate_schedule) == ("none", "sum", "constant")
    for name in ("feature_normalization", "layer_reduction", "intermediate_schedule"):
        with pytest.raises(ValueError, match=name):
            DistillationArguments(output_dir="x", report_to=[], **{name: "other"})
    # balanced terms at constant weights plus masked copies of each batch
    a = DistillationArguments(output_dir="x", report_to=[], distill_preset="balanced_augmented")
    assert (a.feature_normalization, a.intermediate_schedule, a.mask_augmentation) == ("teacher", "constant", 0.25)
    assert DistillationArguments(output_dir="x", report_to=[]).distill_preset == "kngpt2"
    assert all(DistillationArguments(output_dir="x", report_to=[], distill_preset=p).mask_augmentation == 0
               for p in ("kngpt2", "kroneckerbert", "balanced"))
    a = DistillationArguments(output_dir="x", report_to=[], distill_preset="balanced_augmented", hidden_weight=0.5)
    assert (a.mask_augmentation, a.hidden_weight) == (0.25, 0.5)
    # "recommended": balanced_augmented without the embedding term (unreachable for a factored embedding),
    # the intermediate terms fading out over training
    rec = DistillationArguments(output_dir="x", report_to=[], distill_preset="recommended")
    aug = DistillationArguments(output_dir="x", report_to=[], distill_preset="balanced_augmented")
    assert (rec.embedding_weight, rec.intermediate_schedule) == (0.0, "linear_decay")
    assert (aug.embedding_weight, aug.intermediate_schedule) == (1.0, "constant")
    changed = ("embedding_weight", "intermediate_schedule")
    assert {k: v for k, v in DISTILLATION_PRESETS["recommended"].items() if k not in changed} == {
        k: v for k, v in DISTILLATION_PRESETS["balanced_augmented"].items() if k not in changed}
    for bad in (1.0, -0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match=r"mask_augmentation must be a number in \[0, 1\)"):
            DistillationArguments(output_dir="x", report_to=[], mask_augmentation=bad)


def test_normalized_hidden_mse_is_relative_to_the_teacher():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8) * 30.0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert hidden_mse(torch.zeros_like(t), t, mask, normalize=True).item() == pytest.approx(1.0, rel=1e-6)
    s = t + torch.randn_like(t)
    raw = hidden_mse(s, t, mask)
    keep = mask.bool()
    assert hidden_mse(s, t, mask, normalize=True).item() == pytest.approx(
        raw.item() / t[keep].pow(2).mean().item(), rel=1e-5)
    # scale-free: the same relative error at any activation scale
    assert hidden_mse(10 * s, 10 * t, mask, normalize=True).item() == pytest.approx(
        hidden_mse(s, t, mask, normalize=True).item(), rel=1e-5)


# ----------------------------------------------------------------------------- the trainer


def test_trainer_errors_before_training(tmp_path):
    teacher, student = tiny_pair()
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    other_vocab = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=65, n_positions=32))
    with pytest.raises(ValueError, match="vocabularies differ"):
        ILKDTrainer(model=other_vocab, args=args, teacher_model=teacher)
    deeper = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="needs equal depths"):
        ILKDTrainer(model=deeper, args=args, teacher_model=teacher)
    with pytest.raises(ValueError, match="teacher_model"):
        ILKDTrainer(model=student, args=args)


class _Collect(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_every_term_is_logged_for_train_and_eval(tmp_path):
    teacher, student = tiny_pair()
    cb = _Collect()
    args = DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, logging_steps=2,
                                 eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                                 distill_preset="kngpt2")
    ds = lm_dataset(32)
    trainer = ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=ds, eval_dataset=ds,
                          callbacks=[cb])
    trainer.train()
    terms = ["loss_embedding", "loss_hidden", "loss_attention", "loss_logits", "loss_labels"]
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 2 and len(eval_logs) == 2
    for h in train_logs:
        assert all(math.isfinite(h[t]) for t in terms)
        # the total is the weighted sum of the terms (all weights 1 in this preset)
        assert h["loss"] == pytest.approx(sum(h[t] for t in terms), rel=1e-4)
    for h in eval_logs:
        assert h["eval_loss"] == pytest.approx(sum(h[f"eval_{t}"] for t in terms), rel=1e-4)
    seen = {k for log in cb.logs for k in log}
    assert set(terms) <= seen and {f"eval_{t}" for t in terms} <= seen
    # evaluation predictions carry logits only
    pred = trainer.predict(ds.select(range(4)))
    assert pred.predictions.shape == (4, 12, 64)


@pytest.mark.parametrize("schedule", ["two_phase", "linear_decay"])
def test_balanced_preset_schedules_the_intermediate_terms(tmp_path, schedule):
    """The logged terms are raw; the total is Σ weight·scale·term with, for the step that computed
    the loss, two_phase (the preset's default): intermediate terms alone in the first half, task
    terms alone after; linear_decay: intermediate terms scaled by 1 - step/max_steps."""
    teacher, student = tiny_pair()
    args = DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, logging_steps=1,
                                 report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
                                 distill_preset="balanced",
                                 **({} if schedule == "two_phase" else {"intermediate_schedule": schedule}))
    assert args.intermediate_schedule == schedule
    trainer = ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=lm_dataset(32))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for step, h in enumerate(logs):
        if schedule == "two_phase":
            inter_scale, task_scale = (1.0, 0.0) if step < 2 else (0.0, 1.0)
        else:
            inter_scale, task_scale = 1 - step / 4, 1.0
        inter = sum(h[f"loss_{t}"] for t in ("embedding", "hidden", "attention"))
        task = h["loss_logits"] + h["loss_labels"]
        assert h["loss"] == pytest.approx(inter_scale * inter + task_scale * task, rel=1e-4)
    # on text alone (no task term) the intermediate terms are the objective: no schedule
    assert trainer._term_scales({"hidden": torch.tensor(1.0)}) == (1.0, 1.0)


def test_gradient_accumulation_matches_a_full_batch(tmp_path):
    a = run(str(tmp_path / "a"), batch=8, accumulation=1, steps=4)
    b = run(str(tmp_path / "b"), batch=4, accumulation=2, steps=4)
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert la == pytest.approx(lb, abs=1e-5)
    for term in ("loss_hidden", "loss_attention"):
        ta = [h[term] for h in a.state.log_history if term in h]
        tb = [h[term] for h in b.state.log_history if term in h]
        assert ta == pytest.approx(tb, abs=1e-5)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def test_resume_matches_an_uninterrupted_run_projections_included(tmp_path):
    full = run(str(tmp_path / "full"), batch=8, accumulation=1, steps=6)

    # interrupted: train 3 steps of a 6-step schedule, checkpoint, stop
    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = True

    t1 = run(str(tmp_path / "cut"), batch=8, accumulation=1, steps=6, save_steps=3, callbacks=[Stop()])
    assert t1.state.global_step == 3
    resumed = run(str(tmp_path / "cut"), batch=8, accumulation=1, steps=6, save_steps=3,
                  resume_from=str(tmp_path / "cut" / "checkpoint-3"))
    sf, sr = full.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("ilkd_projections.") for k in sr)
    # the checkpoint holds the student and its projections, never the teacher
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cut" / "checkpoint-3" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(sr) - {"lm_head.weight"}  # GPT-2's head is tied to wte and stored once
    assert max((sf[k] - sr[k]).abs().max().item() for k in sf) < 1e-6


def test_final_save_writes_a_clean_student_and_the_projections(tmp_path):
    from transformers import AutoModelForCausalLM

    from kn_transformers.distillation import load_projections

    trainer = run(str(tmp_path / "r"), batch=8, accumulation=1, steps=2)
    trainer.save_model(str(tmp_path / "final"))
    files = os.listdir(tmp_path / "final")
    assert "ilkd_projections.safetensors" in files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not hasattr(reloaded, "ilkd_projections")
    live = trainer.model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, live[k])
    # and the projections come back onto a fresh trainer's student
    teacher, student = tiny_pair()
    t2 = ILKDTrainer(model=student, teacher_model=teacher,
                     args=DistillationArguments(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True))
    load_projections(t2.model, str(tmp_path / "final"))
    assert torch.equal(t2.model.ilkd_projections.hidden.weight, trainer.model.ilkd_projections.hidden.weight)


def test_torchrun_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(HERE / "ilkd_run.py"), str(tmp_path / "ddp"), "4", "1", "5"]
    (tmp_path / "ddp").mkdir()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "student-rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "student-rank1.pt")
    assert max((r0[k] - r1[k]).abs().max().item() for k in r0) == 0.0
    single = run(str(tmp_path / "one"), batch=8, accumulation=1, steps=5)
    s = single.model.state_dict()
    assert any(k.startswith("ilkd_projections.") for k in r0)
    assert max((r0[k] - s[k]).abs().max().item() for k in r0) < 1e-5
    log = json.loads((tmp_path / "ddp" / "log-rank0.json").read_text())
    assert all("loss_hidden" in h for h in log if "loss" in h)
    for rank in (0, 1):
        placement = json.loads((tmp_path / "ddp" / f"placement-rank{rank}.json").read_text())
        assert placement == {"student_wrapped_in_ddp": True, "teacher_wrapped_in_ddp": False,
                             "teacher_trainable_params": 0, "teacher_training_mode": False}


def test_classification_stage_two_with_mse_scores_and_ffn(tmp_path):
    """KroneckerBERT's loss on a BERT pair: scores MSE, FFN outputs, soft and hard labels."""
    from datasets import Dataset

    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=40, num_labels=3,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForSequenceClassification(BertConfig(hidden_size=16, **cfg))
    student = BertForSequenceClassification(BertConfig(hidden_size=8, **cfg))
    ids = torch.randint(1, 40, (32, 10))
    am = torch.ones_like(ids)
    am[::2, 6:] = 0  # padding
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": am.tolist(),
                            "labels": torch.randint(0, 3, (32,)).tolist()})
    args = DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, logging_steps=1,
                                 report_to=[], use_cpu=True, disable_tqdm=True, distill_preset="kroneckerbert")
    trainer = ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=ds)
    trainer.train()
    h = trainer.state.log_history[0]
    assert {"loss_embedding", "loss_attention", "loss_ffn", "loss_logits", "loss_labels"} <= h.keys()
    assert "loss_hidden" not in h
    assert set(trainer.model.ilkd_projections.keys()) == {"embedding", "ffn"}


def _tiny_bert_classifier_pair_and_tokenizer():
    """A BERT teacher and student of 2 labels, a WordPiece tokenizer of their 40 ids, 32 rows."""
    from transformers import BertTokenizer

    words = [chr(97 + i) for i in range(26)] + ["a" + chr(97 + i) for i in range(9)]  # whole WordPiece tokens
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=40, num_labels=2,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForSequenceClassification(BertConfig(hidden_size=16, **cfg))
    student = BertForSequenceClassification(BertConfig(hidden_size=16, **cfg))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(32):
        text = " ".join(words[j] for j in torch.randint(0, 35, (3 + i % 6,), generator=gen).tolist())
        rows.append(dict(tokenizer(text), labels=i % 2))
    return teacher, student, tokenizer, rows


def test_mask_augmentation_distils_the_teacher_on_masked_copies(tmp_path):
    """balanced_augmented: every step adds the teacher terms (not the labels) on a copy of the batch
    whose real, non-special tokens are masked at the set rate; logged as loss_augmented_*."""
    from transformers import DataCollatorWithPadding

    teacher, student, tokenizer, rows = _tiny_bert_classifier_pair_and_tokenizer()
    collate = DataCollatorWithPadding(tokenizer)
    special = torch.tensor(tokenizer.all_special_ids)

    def copy_of(model):
        clone = BertForSequenceClassification(model.config)
        clone.load_state_dict(model.state_dict())
        return clone

    def make(out, **over):
        args = DistillationArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=8, max_steps=3,
                                     logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                                     save_strategy="no", distill_preset="balanced_augmented", **over)
        return ILKDTrainer(model=copy_of(student), args=args, teacher_model=teacher, train_dataset=rows,
                           data_collator=collate, processing_class=tokenizer)

    trainer = make("a")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    teacher_terms = ("embedding", "hidden", "attention", "logits")
    for h in logs:
        assert "loss_augmented_labels" not in h
        plain = sum(h[f"loss_{t}"] for t in teacher_terms + ("labels",))
        augmented = sum(h[f"loss_augmented_{t}"] for t in teacher_terms)
        assert h["loss"] == pytest.approx(plain + augmented, rel=1e-4)  # unit weights, constant schedule
    # the Trainer seeds the masks: the same run twice is the same
    again = make("b")
    again.train()
    assert [h["loss"] for h in again.state.log_history if "loss" in h] == [h["loss"] for h in logs]

    # the masked copy: no labels, only real non-special tokens change, all to [MASK], at about the rate
    batch = collate(rows)
    big = {k: v.repeat(40, 1) if v.dim() == 2 else v for k, v in batch.items()}
    real = big["attention_mask"].bool() & ~torch.isin(big["input_ids"], special)
    torch.manual_seed(0)
    masked = trainer._masked_copy(big)
    assert set(masked) == set(big) - {"labels"}
    changed = masked["input_ids"] != big["input_ids"]
    assert not (changed & ~real).any() and (masked["input_ids"][changed] == tokenizer.mask_token_id).all()
    assert changed.sum().item() / real.sum().item() == pytest.approx(0.25, rel=0.1)
    # a tokenizer without a mask token (GPT-2's): random non-special tokens instead
    trainer._mask_id = None
    drawn = trainer._masked_copy(big)["input_ids"]
    changed = drawn != big["input_ids"]
    assert not (changed & ~real).any() and not torch.isin(drawn[changed], special).any()
    assert changed.sum().item() / real.sum().item() == pytest.approx(0.25 * 35 / 40, rel=0.15)

    with pytest.raises(ValueError, match="needs processing_class= the tokenizer"):
        ILKDTrainer(model=copy_of(student), teacher_model=teacher, train_dataset=rows,
                    args=DistillationArguments(output_dir=str(tmp_path / "c"), report_to=[], use_cpu=True,
                                               distill_preset="balanced_augmented"))
    with pytest.raises(ValueError, match="every teacher term has weight 0"):
        make("d", embedding_weight=0, hidden_weight=0, attention_weight=0, logits_weight=0)


# ----------------------------------------------------------------------------- Kronecker students


def _hidden_mse_to_teacher(student, teacher, ds):
    batch = {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states
        t = teacher(**batch, output_hidden_states=True).hidden_states
    return sum(hidden_mse(a, b, batch["attention_mask"]) for a, b in zip(s, t)).item()


def test_kronecker_student_distils_better_than_labels_alone(tmp_path):
    from transformers import Trainer, TrainingArguments

    from kn_transformers import KnGPT2LMHeadModel, kngpt2_from_gpt2

    torch.manual_seed(0)
    # a teacher with weights of std 0.1 that has learnt the sequences (it attends to the previous
    # token): structure in every distilled feature
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1))
    train, held_out = lm_dataset(160, seed=1), lm_dataset(32, seed=7)
    common = dict(per_device_train_batch_size=8, max_steps=60, learning_rate=5e-3, logging_steps=15, report_to=[],
                  use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True)
    teacher_args = TrainingArguments(output_dir=str(tmp_path / "t"), **{**common, "max_steps": 100,
                                                                          "learning_rate": 3e-3})
    Trainer(model=teacher, train_dataset=train, args=teacher_args).train()
    teacher.eval()
    # the student: the paper's Kronecker layers (odd layers at factor 2), randomly initialised, so
    # that it starts away from the teacher in every feature. (From the nearest-Kronecker
    # initialisation some terms start at their optimum: the SVD minimises exactly that error.)
    config = kngpt2_from_gpt2(teacher, preset="paper", embedding=False, progress=False).config
    config.initializer_range = 0.02

    def student():
        torch.manual_seed(0)
        return KnGPT2LMHeadModel(config)

    distilled = student()
    assert sum(type(m).__name__ == "KroneckerLinear" for m in distilled.modules()) == 4
    before = _hidden_mse_to_teacher(distilled, teacher, held_out)
    t = ILKDTrainer(model=distilled, teacher_model=teacher, train_dataset=train,
                    args=DistillationArguments(output_dir=str(tmp_path / "ilkd"), distill_preset="kngpt2", **common))
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 4
    for term in ("loss_embedding", "loss_hidden", "loss_attention", "loss_logits", "loss_labels"):
        assert logs[-1][term] < logs[0][term], (term, [h[term] for h in logs])

    labels_only = student()
    Trainer(model=labels_only, train_dataset=train,
            args=TrainingArguments(output_dir=str(tmp_path / "ce"), **common)).train()
    after_ilkd = _hidden_mse_to_teacher(distilled.eval(), teacher, held_out)
    after_ce = _hidden_mse_to_teacher(labels_only.eval(), teacher, held_out)
    print(f"\nhidden-state MSE to the teacher: init {before:.4f}, ILKD {after_ilkd:.4f}, labels only {after_ce:.4f}")
    assert after_ilkd < before and after_ilkd < after_ce


def test_logits_only_kd_allows_other_depths_and_hooks_do_not_outlive_a_step(tmp_path):
    """DistilGPT2-style KD (logits + labels) between a 2-layer teacher and a 1-layer student; the
    FFN hooks of a kroneckerbert-style run are gone after training, so a reused teacher is clean."""
    teacher, _ = tiny_pair()
    shallow = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    common = dict(per_device_train_batch_size=8, max_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                  save_strategy="no", logging_steps=1)
    args = DistillationArguments(output_dir=str(tmp_path / "a"), embedding_weight=0, hidden_weight=0,
                                 attention_weight=0, ffn_weight=0, **common)
    trainer = ILKDTrainer(model=shallow, teacher_model=teacher, args=args, train_dataset=lm_dataset(32))
    trainer.train()
    assert {"loss_logits", "loss_labels"} <= trainer.state.log_history[0].keys()
    assert "loss_hidden" not in trainer.state.log_history[0]

    _, student = tiny_pair()  # narrower: projections are hooked on the student too
    args = DistillationArguments(output_dir=str(tmp_path / "b"), distill_preset="kroneckerbert", **common)

    def hooks(model):  # transformers installs its own output-capturing hooks once; ours must not stay
        return sum(len(m._forward_hooks) for m in model.modules())

    counts = []
    for _ in range(2):  # the same teacher in two trainers
        ILKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(32)).train()
        assert not any(m._forward_hooks for name, m in teacher.named_modules() if name.endswith("mlp"))
        assert not student._forward_hooks
        counts.append((hooks(teacher), hooks(student)))
    assert counts[0] == counts[1]
