"""Generate ``RESULTS.md`` and the charts from the studies' JSON (nothing typed by hand).

    .venv/bin/python benchmarks/make_results.py

Reads ``benchmarks/results/kroneckerbert_ablation.json`` (``study_kroneckerbert.py``) and
``benchmarks/results/kngpt2_vs_distilgpt2.json`` (``study_kngpt2.py``), writes
``benchmarks/results/kroneckerbert_ablation.png`` and ``benchmarks/results/kngpt2_perplexity.png``,
and ``RESULTS.md`` at the repository root. The speed and memory tables come from
``benchmarks/results/speed.md`` when that file exists (written by the speed benchmarks); it is
included verbatim under "Speed and memory". The "honest reading" sentences are chosen by
comparing the measured numbers; no number in ``RESULTS.md`` is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
VARIANT_LABEL = {"stage1+ILKD": "(a) stage-1 ILKD + stage-2 ILKD", "ILKD": "(b) stage-2 ILKD only",
                 "labels": "(c) labels only"}
METRIC_LABEL = {"accuracy": "accuracy", "matthews_correlation": "Matthews corr."}
TASK_LABEL = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE"}
STUDENT_LABEL = {"kngpt2": "KnGPT2 (teacher depth, Kronecker layers, ILKD)",
                 "kngpt2_activation": "KnGPT2, activation-aware init (ILKD)",
                 "kngpt2_budget": "KnGPT2, activation-aware init + global budget (ILKD)",
                 "distilgpt2_style": "DistilGPT2-style (half depth, dense, logits KD + LM)"}
KNGPT2_TARGET = 0.05  # the paper's headline at our scale: >= 5% lower held-out perplexity than DistilGPT2-style


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default=RESULTS)
    p.add_argument("--output", default=os.path.join(ROOT, "RESULTS.md"))
    return p.parse_args(argv)


def load(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


_DOC_DIR = [ROOT]


def rel(path: str) -> str:
    """``path`` relative to the folder of the document being written (for Markdown image links)."""
    return os.path.relpath(path, _DOC_DIR[0])


def noise_band(metric: str, score: float, n: int) -> float:
    """Two standard errors of the metric on ``n`` dev examples (binomial for accuracy; ~1/sqrt(n)
    for Matthews correlation near the scores seen here): differences below it are noise."""
    if metric == "accuracy":
        return 2 * (max(score * (1 - score), 1e-6) / n) ** 0.5
    return 2 / n ** 0.5


def two_standard_errors(a: list[float], b: list[float]) -> float:
    """Two standard errors of the difference of the means of two sets of seeds' scores."""
    return 2 * (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5


# -- study 1 ------------------------------------------------------------------------------------


def ablation_rows(d: dict):
    """(task, preset, variant, score, retention) for every finished student."""
    for task, e in d.get("tasks", {}).items():
        for preset, variants in e.get("students", {}).items():
            for variant in d["variants"]:
                if variant in variants:
                    r = variants[variant]
                    yield task, preset, variant, r["score"], r["retention"]


def ablation_chart(d: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in d["budgets"]["tasks"] if t in d.get("tasks", {}) and "teacher" in d["tasks"][t]]
    if not tasks:
        return None
    presets = d["budgets"]["presets"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.5, 4.6 * len(tasks)), 4.2), squeeze=False)
    colors = {"stage1+ILKD": "#DD8452", "ILKD": "#55A868", "labels": "#8C8C8C"}
    for ax, task in zip(axes[0], tasks):
        e = d["tasks"][task]
        teacher = e["teacher"]["score"]
        width = 0.8 / len(d["variants"])
        for j, variant in enumerate(d["variants"]):
            xs, ys, ret, err = [], [], [], []
            for i, preset in enumerate(presets):
                r = e.get("students", {}).get(preset, {}).get(variant)
                if r is not None:
                    xs.append(i + (j - (len(d["variants"]) - 1) / 2) * width)
                    ys.append(r["score"])
                    ret.append(r["retention"])
                    err.append(r.get("std") or 0.0)  # standard deviation over seeds, where there are several
            bars = ax.bar(xs, ys, width, yerr=err if any(err) else None, capsize=3, color=colors.get(variant),
                          label=VARIANT_LABEL[variant])
            ax.bar_label(bars, labels=[f"{y:.2f}\n{r:.0%}" if r is not None else f"{y:.2f}" for y, r in zip(ys, ret)],
                         fontsize=7)
        ax.axhline(teacher, color="#4C72B0", lw=1.5, label="teacher")
        ax.set_xticks(range(len(presets)), presets)
        metric = METRIC_LABEL.get(e["metric"], e["metric"])
        ax.set_ylabel(f"dev {metric}")
        ax.set_title(f"{TASK_LABEL.get(task, task)}: teacher {teacher:.3f} (bars: score, retention)", fontsize=10)
        lo = min([0.0] + [r["score"] for v in e.get("students", {}).values() for r in v.values()])
        ax.set_ylim(min(lo, 0.0) - 0.05 if e["metric"] == "matthews_correlation" else 0.4, max(teacher, 0.1) * 1.2)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles, labels = handles[1:] + handles[:1], labels[1:] + ["teacher (per task)"]  # variants first
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("KroneckerBERT ablation at this machine's scale (MiniLM-L6-H384 teacher)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: the recommended recipe's ablation, one study per preset (each fits the ~40-minute budget of a study)
HEADLINE_ABLATIONS = ("kroneckerbert8_ablation_sst2_recommended", "kroneckerbert21_ablation_sst2_recommended")


#: the README command's study (``study_run_glue.py``), one per preset; without them ``run_glue_readme.json``
README_COMMAND_RUNS = ("run_glue_readme_kroneckerbert8", "run_glue_readme_kroneckerbert21")


def per_preset_heading(title: str) -> list[str]:
    """The heading of a study recorded as one file per preset (the headline ablation, the README command)."""
    return [title, "", "One study per preset (the same command but for `--presets`), so that each fits a study's "
            "budget.", ""]


def preset_run_title(name: str, presets: list[str]) -> str:
    """The sub-heading of one preset's file of such a study."""
    return f"### {' and '.join(f'`{p}`' for p in presets)} (`{name}.json`)"


def headline_reference(headlines: list[dict]) -> Optional[dict]:
    """What the other runs' titles are compared with: the first headline study's budgets, with the
    presets of all of them and the date of the earliest."""
    if not headlines:
        return None
    presets = [p for h in headlines for p in h["budgets"].get("presets", [])]
    return {"budgets": {**headlines[0]["budgets"], "presets": presets},
            "environment": {"date": min(h.get("environment", {}).get("date", "") for h in headlines)}}


def other_run_title(name: str, d: dict, headline: Optional[dict]) -> str:
    """A heading that says what another ablation run changed: its stage-2 losses, init, seeds and,
    where they differ from the headline run's, its presets, training rows and student steps."""
    b = d["budgets"]
    date = d.get("environment", {}).get("date", "")
    when = "Later run" if headline and date > headline.get("environment", {}).get("date", "") else "Earlier run"
    if b.get("teachers_only"):
        return f"{when}: `{name}.json`, teachers of {', '.join(TASK_LABEL.get(t, t) for t in b['tasks'])} trained to their plateau"
    weights = ", ".join(f"{k}={v}" for k, v in (b.get("stage2_weights") or {}).items())
    extra = ""
    if headline and b.get("presets") != headline["budgets"].get("presets"):
        extra += f", {' and '.join(b['presets'])} only"
    if b.get("keep_dense"):
        extra += f", {' and '.join(f'`{m}`' for m in b['keep_dense'])} kept dense"
    for key, unit in (("train_rows", "training rows"), ("student_steps", "student steps")):
        if headline and b.get(key) != headline["budgets"].get(key):
            extra += ", " + ", ".join(f"{TASK_LABEL.get(t, t)} {n:,} {unit}" for t, n in b[key].items())
    return (f"{when}: `{name}.json`, stage-2 preset `{b.get('stage2_preset', 'kroneckerbert')}`"
            f"{f' ({weights})' if weights else ''}, {b.get('init', 'svd')} init, "
            f"{len(b.get('seeds') or [b.get('seed')])} seed(s){extra}")


def reproduce_line(d: dict) -> list[str]:
    """Where a run's command no longer reproduces it at the current code: the commit that does, and why."""
    if not d.get("reproduce_at"):
        return []
    why = f" ({d['reproduce_why']})" if d.get("reproduce_why") else ""
    return [f"Measured with the code of commit `{d['reproduce_at']}`{why}: its command reproduces it there.", ""]


def ablation_section(d: Optional[dict], chart: Optional[str], title: str = "") -> list[str]:
    """The ablation's tables; ``title`` is the whole heading line (default: the first accuracy section's)."""
    out = [title or "## Accuracy 1: KroneckerBERT ablation (paper Table 6)", ""]
    if d is None:
        return out + ["Not run yet: `benchmarks/study_kroneckerbert.py` writes "
                      "`benchmarks/results/kroneckerbert_ablation.json`.", ""]
    b = d["budgets"]
    def init_name(kind, rows):
        return ("nearest-Kronecker initialisation" if kind == "svd" else
                f"activation-aware initialisation on {b.get('calibration_samples')} {rows}")

    kinds = {"stage-2 ILKD": b.get("init", "svd"), "labels only": b.get("labels_init") or b.get("init", "svd"),
             "stage 1": b.get("stage1_init", "svd")}
    if not b.get("stage1_steps"):
        del kinds["stage 1"]
    init = (init_name(kinds["stage-2 ILKD"], "training rows") if len(set(kinds.values())) == 1 else
            "; ".join(f"{who}: {init_name(k, 'text blocks' if who == 'stage 1' else 'training rows')}"
                      for who, k in kinds.items()))
    out += [f"Teacher: {d['teacher']}, fine-tuned per task. Students converted from the fine-tuned teacher "
            f"({init}, classifier and pooler copied); the variants of a preset "
            "share stage-2 steps, batch, learning rate and seed.", ""]
    if not d.get("complete"):
        out += ["**Partial run**: the JSON was written by an unfinished study; missing rows were not measured.", ""]
    out += ["Command:", "", "```bash", d["command"], "```", ""] + reproduce_line(d) + [
            f"Measured wall time: {fmt_s(d.get('wall_seconds'))} (torch threads: {d['environment']['threads']}, "
            f"torch {d['environment']['torch']}, transformers {d['environment']['transformers']}, "
            f"run {d['environment']['date']}).", ""]
    out += ["| task (metric) | train rows | max length | batch | teacher steps | student steps | teacher |",
            "|---|---|---|---|---|---|---|"]
    for task, e in d.get("tasks", {}).items():
        t = e.get("teacher")
        out.append(f"| {TASK_LABEL.get(task, task)} ({METRIC_LABEL.get(e['metric'], e['metric'])}) | {e['train_rows']:,}"
                   f" | {e['max_length']} | {e['batch_size']} | {e['teacher_steps']} | {e['student_steps']} | "
                   + (f"{t['score']:.4f} ({fmt_s(t['seconds'])})" if t else "n/a") + " |")
    out.append("")
    curves = [(task, e) for task, e in d.get("tasks", {}).items() if e.get("teacher_curve")]
    if curves:
        out += [f"Teacher plateau: metric on {b.get('teacher_val_rows', 'n/a')} held-out training rows every "
                f"{b.get('teacher_eval_every')} steps (patience {b.get('teacher_patience')}); the best state is kept "
                "and scored on the dev set above:", ""]
        for task, e in curves:
            out.append(f"- {TASK_LABEL.get(task, task)}: " + ", ".join(f"{s}: {v:.3f}" for s, v in e["teacher_curve"])
                       + f" (kept step {e['teacher'].get('steps')})")
        out.append("")
    if d.get("stage1"):
        s1d = d.get("stage1_data", {})
        out += [f"Stage 1 (general distillation of the MiniLM encoder on WikiText-2 text, "
                f"{s1d.get('train_blocks', 'n/a')} training blocks, {s1d.get('heldout_blocks', 'n/a')} held out):", "",
                "| preset | encoder params | steps x batch x block | tokens seen | held-out ILKD loss before | after | time |",
                "|---|---|---|---|---|---|---|"]
        for preset, s in d["stage1"].items():
            out.append(f"| {preset} | {s['parameters_encoder'] / 1e6:.2f}M | {s['steps']} x {s['batch_size']} x "
                       f"{s['block_size']} | {s['tokens_seen']:,} | {s['heldout_before']['eval_loss']:.3f} | "
                       f"{s['heldout_after']['eval_loss']:.3f} | {fmt_s(s['seconds'])} |")
        out.append("")
    budgets = ["Budgets: " + ", ".join(f"`{k}={v}`" for k, v in b.items()), ""]
    if b.get("teachers_only"):
        return out + ["Teachers only (`--teachers_only`): no students were trained in this run.", ""] + budgets
    seeds = b.get("seeds")
    out += ["Dev-set scores (official metric) and retention = student / teacher"
            + (f"; mean ± standard deviation over seeds {seeds}" if seeds and len(seeds) > 1 else "") + ":", "",
            "| task | preset | params | " + " | ".join(VARIANT_LABEL[v] for v in d["variants"]) + " |",
            "|---|---|---|" + "---|" * len(d["variants"])]
    for task, e in d.get("tasks", {}).items():
        for preset, variants in e.get("students", {}).items():
            params = next(iter(variants.values()))["parameters"]
            cells = []
            for v in d["variants"]:
                r = variants.get(v)
                if r is None:
                    cells.append("not run")
                    continue
                sd = f" ± {r['std']:.4f}" if r.get("std") is not None else ""
                cells.append(f"{r['score']:.4f}{sd} ({r['retention']:.0%})" if r["retention"] is not None
                             else f"{r['score']:.4f}{sd}")
            out.append(f"| {TASK_LABEL.get(task, task)} | {preset} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    out.append("")
    if chart:
        out += [f"![KroneckerBERT ablation]({rel(chart)})", ""]
    out += budgets
    if "stage2_weights" not in b:
        out += ["This run predates `--stage2_weights`: stage 2 used the paper's unit weights, and the script's "
                "defaults were the budgets above (`benchmarks/README.md` gives the command that repeats it today).",
                ""]
    return out


def constant_scores(task: str, e: dict) -> list[float]:
    """Dev scores of the two constant predictors (always class 0, always class 1)."""
    if e["metric"] == "matthews_correlation":
        return [0.0]
    counts = e.get("dev_label_counts")
    if counts is None:  # older JSON: count the labels of the offline dev file, if present
        path = os.path.join(ROOT, "..", "shared", "data", "glue", task, "validation.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            labels = [json.loads(line)["label"] for line in f if line.strip()]
        counts = {str(c): labels.count(c) for c in (0, 1)}
    n = sum(counts.values())
    return [c / n for c in counts.values()] if n else []


def ablation_reading(d: Optional[dict]) -> list[str]:
    if d is None or not d.get("tasks"):
        return []
    lines = []
    rows = list(ablation_rows(d))
    by = {(t, p, v): s for t, p, v, s, _ in rows}
    runs = {(t, p, v): r.get("scores") for t, e in d["tasks"].items() for p, vs in e.get("students", {}).items()
            for v, r in vs.items()}

    def band_of(t, p, a, b) -> float:
        """Two standard errors of the difference: across seeds where there are several, else the
        binomial (dev-set) noise of one run."""
        sa, sb = runs.get((t, p, a)), runs.get((t, p, b))
        if sa and sb and len(sa) > 1 and len(sb) > 1:
            return two_standard_errors(sa, sb)
        return band.get(t, 0)
    pairs = sorted({(t, p) for t, p, *_ in rows})

    band = {t: noise_band(e["metric"], e["teacher"]["score"], e["dev_rows"]) for t, e in d["tasks"].items()
            if "teacher" in e}
    consts = {t: constant_scores(t, e) for t, e in d["tasks"].items()}

    def is_const(t: str, score: float) -> bool:
        return any(abs(score - c) < 1e-9 for c in consts.get(t, []))

    # a task whose teacher predicts one class says nothing about distillation: left out of the claims
    dead = sorted(t for t, e in d["tasks"].items() if "teacher" in e and is_const(t, e["teacher"]["score"]))
    if dead:
        lines.append(f"- Left out of the comparisons below: {', '.join(TASK_LABEL.get(t, t) for t in dead)}, whose "
                     "fine-tuned teacher predicts a single class on the dev set at this budget.")
    pairs = [(t, p) for t, p in pairs if t not in dead]

    def compare(a: str, b: str, claim: str, verb: str) -> None:
        cmp = [(t, p, by[(t, p, a)] - by[(t, p, b)]) for t, p in pairs if (t, p, a) in by and (t, p, b) in by]
        if not cmp:
            return
        up = [c for c in cmp if c[2] > band_of(c[0], c[1], a, b)]  # clearly better: beyond two standard errors
        down = [c for c in cmp if c[2] < -band_of(c[0], c[1], a, b)]  # clearly worse
        ahead = [c for c in cmp if c[2] > 0]
        detail = "; ".join(f"{TASK_LABEL.get(t, t)}/{p} {delta:+.3f} (noise band ±{band_of(t, p, a, b):.3f}"
                           + (", both predict one class" if is_const(t, by[(t, p, a)]) and is_const(t, by[(t, p, b)])
                              else "") + ")" for t, p, delta in cmp)
        n = len(cmp)
        if len(up) == n:
            verdict = f"holds here: {verb} clearly (beyond two standard errors) in all {n} task/preset pairs"
        elif not up and not down:
            verdict = (f"inconclusive here: no difference exceeds two standard errors of the dev metric "
                       f"({verb} numerically in {len(ahead)} of {n} pairs)")
        elif not down:
            verdict = (f"holds partly: {verb} clearly in {len(up)} of {n} pairs, the rest within noise "
                       f"({verb} numerically in {len(ahead)} of {n})")
        elif not up:
            verdict = (f"does not hold here: the opposite is clear in {len(down)} of {n} pairs, the rest within "
                       f"noise ({verb} numerically in {len(ahead)} of {n})")
        else:
            verdict = (f"mixed: {verb} clearly in {len(up)} of {n} pairs, clearly the opposite in {len(down)}, "
                       "the rest within noise")
        lines.append(f"- *{claim}* — {verdict} (difference in the official metric: {detail}).")

    compare("stage1+ILKD", "ILKD", "Stage-1 general distillation helps (paper Table 6)", "(a) beats (b)")
    compare("ILKD", "labels", "ILKD beats training on labels alone", "(b) beats (c)")
    compare("stage1+ILKD", "labels", "The full two-stage recipe beats labels alone", "(a) beats (c)")
    best = {}
    for t, p, v, s, r in rows:
        if t not in dead and r is not None and (best.get((t, p)) is None or r > best[(t, p)][1]):
            best[(t, p)] = (v, r)
    if best:
        above90 = [k for k, (_, r) in best.items() if r >= 0.9]
        detail = "; ".join(f"{TASK_LABEL.get(t, t)}/{p} {r:.0%} ({v})" for (t, p), (v, r) in sorted(best.items()))
        lines.append(f"- *Retention of the teacher's score*: the best variant keeps at least 90% of the teacher in "
                     f"{len(above90)} of {len(best)} task/preset pairs ({detail})."
                     + ("" if len(above90) == len(best) else
                        " The paper reports high retention for kroneckerbert8 after full-scale two-stage training "
                        "(3 epochs on 10% of Wikipedia, then full GLUE); the budgets here are a few hundred steps, "
                        "so low retention measures the budget as much as the method."))
    target = best.get(("sst2", "kroneckerbert8"))
    if target and not d["budgets"].get("keep_dense"):  # the target is for the preset as it is
        lines.append(f"- *Target (issue 14): kroneckerbert8 keeps at least 97% of its teacher's SST-2 accuracy* — "
                     f"{'met' if target[1] >= 0.97 else 'not met'}: {target[1]:.1%} ({target[0]}).")
    for t, e in d["tasks"].items():
        consts = constant_scores(t, e)
        flat = []
        if "teacher" in e and any(abs(e["teacher"]["score"] - c) < 1e-9 for c in consts):
            flat.append("the teacher")
        flat += [f"{p} {v}" for p, vs in e.get("students", {}).items() for v, r in vs.items()
                 if any(abs(r["score"] - c) < 1e-9 for c in consts)]
        if flat:
            lines.append(f"- {TASK_LABEL.get(t, t)}: {', '.join(flat)} scored exactly what predicting one class for "
                         "every dev example scores: at this budget they have not learnt the task.")
    chance = [(t, e["teacher"]["score"]) for t, e in d["tasks"].items() if "teacher" in e and (
        (e["metric"] == "accuracy" and e["teacher"]["score"] < 0.6) or
        (e["metric"] == "matthews_correlation" and e["teacher"]["score"] < 0.2))]
    for t, s in chance:
        curve = d["tasks"][t].get("teacher_curve") or []
        stopped = curve and len(curve) * (d["budgets"].get("teacher_eval_every") or 0) < d["tasks"][t]["teacher_steps"]
        if stopped:  # early stopping fired: the teacher reached its plateau, not the end of its budget
            step, best_val = max(curve, key=lambda c: c[1])
            lines.append(f"- {TASK_LABEL.get(t, t)}: the teacher reached its plateau (best held-out metric {best_val:.3f} "
                         f"at step {step}, no gain in the {len(curve) - [c[0] for c in curve].index(step) - 1} "
                         f"evaluations after it) and scores {s:.3f} on the dev set, near chance: the bundled MiniLM "
                         "does not learn this task at a budget that fits here, so the recommended-recipe study "
                         "leaves it out.")
        else:
            lines.append(f"- {TASK_LABEL.get(t, t)}: the teacher itself is near chance ({s:.3f}) at this budget, so "
                         "its student comparisons carry little information.")
    ratios = [r["last_logged_terms"]["loss_attention"] / r["last_logged_terms"]["loss_labels"]
              for e in d["tasks"].values() for vs in e.get("students", {}).values() for v, r in vs.items()
              if v != "labels" and r.get("last_logged_terms") and r["last_logged_terms"].get("loss_labels")
              and "loss_attention" in r["last_logged_terms"]]
    if ratios:
        w = (d["budgets"].get("stage2_weights") or {}).get("attention_weight", 1.0)
        if d["budgets"].get("stage2_preset", "kroneckerbert") != "kroneckerbert":
            lines.append(f"- Loss balance ({d['budgets']['stage2_preset']} preset): the attention term is "
                         f"{min(ratios):.2f}x to {max(ratios):.2f}x the label cross-entropy at the last logged step "
                         "of the ILKD runs (raw terms, before weights and schedule).")
        elif w == 1.0:
            lines.append(f"- Loss balance: with the paper's unweighted sum, the attention-score MSE term is "
                         f"{min(ratios):.0f}x to {max(ratios):.0f}x the label cross-entropy at the last logged step "
                         "of the ILKD runs" + (", so within a short stage 2 the gradient mostly serves the "
                                               "intermediate matches, not the task." if min(ratios) > 5 else "."))
        else:
            lines.append(f"- Loss balance: the attention-score MSE term (weight {w:g} here instead of the paper's 1) "
                         f"is {min(ratios):.0f}x to {max(ratios):.0f}x the label cross-entropy at the last logged "
                         f"step of the ILKD runs, {w * min(ratios):.1f}x to {w * max(ratios):.1f}x after weighting.")
    below = []
    for t, e in d["tasks"].items():
        top = max(constant_scores(t, e) or [0.0])
        below += [f"{TASK_LABEL.get(t, t)}/{p} {v} {r['score']:.3f}" for p, vs in e.get("students", {}).items()
                  for v, r in vs.items() if r["score"] <= top]
    if rows:
        lines.append("- *Majority-class baseline*: " + (
            "every student scores above always predicting the majority class." if not below else
            f"{len(below)} student(s) score at or below always predicting the majority class: {'; '.join(below)}."))
    s1 = d.get("stage1", {})
    for p, s in s1.items():
        b, a = s["heldout_before"]["eval_loss"], s["heldout_after"]["eval_loss"]
        lines.append(f"- Stage 1 for {p} lowered the held-out distillation loss from {b:.3f} to {a:.3f} "
                     f"({a / b:.0%} of its initial value) in {s['tokens_seen']:,} tokens.")
    return lines


# -- study 2 ------------------------------------------------------------------------------------


def curve_chart(d: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not d.get("students"):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"kngpt2": "#DD8452", "kngpt2_activation": "#C44E52", "kngpt2_budget": "#8172B3",
              "distilgpt2_style": "#55A868"}
    for name, s in d["students"].items():
        pts = s.get("curve", [])
        if pts:
            ax.plot([p["tokens"] for p in pts], [p["perplexity"] for p in pts], marker="o", color=colors.get(name),
                    label=f"{STUDENT_LABEL.get(name, name)}, {s['parameters'] / 1e6:.2f}M")
    if "teacher" in d:
        t = d["teacher"]
        ax.axhline(t["perplexity"], color="#4C72B0", ls="--",
                   label=f"teacher ({t['parameters'] / 1e6:.2f}M): {t['perplexity']:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen by the student")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("KnGPT2 vs DistilGPT2-style, equal total size (head counted)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kngpt2_section(d: Optional[dict], chart: Optional[str]) -> list[str]:
    out = ["## Accuracy 2: KnGPT2 vs a DistilGPT2-style student (equal total size)", ""]
    if d is None:
        return out + ["Not run yet: `benchmarks/study_kngpt2.py` writes "
                      "`benchmarks/results/kngpt2_vs_distilgpt2.json`.", ""]
    b, data = d["budgets"], d["data"]
    if not d.get("complete"):
        out += ["**Partial run**: the JSON was written by an unfinished study; missing rows were not measured.", ""]
    stop = (f" until its perplexity on the next {data['validation_tokens']:,} tokens stopped improving (checked every "
            f"{b['teacher_eval_every']} steps, patience {b['teacher_patience']}, best state kept)"
            if data.get("validation_tokens") else "")
    out += [f"Teacher: GPT-2 {b['n_layer']} layers x {b['n_embd']} ({b['n_head']} heads, {b['block_size']} positions, "
            f"tied head) trained from scratch here on {data['train_tokens']:,} tokens of {data['source']}{stop}; the "
            f"last {data['heldout_tokens']:,} tokens are held out. Perplexity: windows of "
            f"{d['perplexity']['max_length']} tokens, stride {d['perplexity']['stride']}. Every student sees the same "
            f"{b['student_steps']} steps x {b['batch_size']} x {b['block_size']} tokens.", "",
            "Command:", "", "```bash", d["command"], "```", "",
            f"Measured wall time: {fmt_s(d.get('wall_seconds'))} (torch threads: {d['environment']['threads']}, run "
            f"{d['environment']['date']}).", "",
            "| model | layers | total params (head counted) | vs teacher | tokens seen | held-out perplexity | train time |",
            "|---|---|---|---|---|---|---|"]
    t = d.get("teacher")
    if t:
        out.append(f"| teacher (dense GPT-2) | {b['n_layer']} | {t['parameters']:,} | 1.00 | {t['tokens_seen']:,} "
                   f"({t['epochs']:.1f} epochs) | {t['perplexity']:.2f} | {fmt_s(t['seconds'])} |")
    for name, s in d.get("students", {}).items():
        ppl = f"{s['perplexity']:.2f}" if "perplexity" in s else "not finished"
        out.append(f"| {STUDENT_LABEL.get(name, name)} | {s['layers']} | {s['parameters']:,} | "
                   f"{s['parameters'] / t['parameters']:.3f} | {s.get('tokens_seen', 0):,} | {ppl} | "
                   f"{fmt_s(s.get('seconds'))} |")
    out.append("")
    if t and t.get("validation_curve"):
        out += ["Teacher training (validation text, not the held-out text): the teacher's perplexity and that of its "
                "own half-depth copy (layers 0, 2, 4, ...: the DistilGPT2-style start), i.e. how much depth is worth "
                "at each point:", "", "| teacher step | teacher | half-depth copy | copy / teacher |", "|---|---|---|---|"]
        out += [f"| {p['step']} | {p['perplexity']:.2f} | {p['half_depth_perplexity']:.2f} | "
                f"{p['half_depth_perplexity'] / p['perplexity']:.2f}x |" for p in t["validation_curve"]]
        out.append("")
    out += ["Perplexity vs tokens seen:", "", "| tokens seen | " + " | ".join(
        STUDENT_LABEL.get(n, n) for n in d.get("students", {})) + " |", "|---|" + "---|" * len(d.get("students", {}))]
    steps = sorted({p["tokens"] for s in d.get("students", {}).values() for p in s.get("curve", [])})
    for tok in steps:
        cells = []
        for s in d["students"].values():
            v = next((p["perplexity"] for p in s.get("curve", []) if p["tokens"] == tok), None)
            cells.append(f"{v:.2f}" if v is not None else "")
        out.append(f"| {tok:,} | " + " | ".join(cells) + " |")
    out.append("")
    if chart:
        out += [f"![perplexity vs tokens]({rel(chart)})", ""]
    out += ["How the sizes were matched: " + "; ".join(f"{STUDENT_LABEL.get(n, n)}: {s['recipe']}"
                                                       for n, s in d.get("students", {}).items()), ""]
    return out


def kngpt2_reading(d: Optional[dict]) -> list[str]:
    if d is None or "teacher" not in d:
        return []
    s, t = d.get("students", {}), d["teacher"]
    g = s.get("distilgpt2_style", {})
    lines = []
    if "perplexity" not in g:
        return lines
    for name, k in s.items():
        if not name.startswith("kngpt2") or "perplexity" not in k:
            continue
        label = STUDENT_LABEL.get(name, name)
        gain = 1 - k["perplexity"] / g["perplexity"]
        size = f"{k['parameters']:,} vs {g['parameters']:,} parameters"
        verdict = ("holds" if gain >= KNGPT2_TARGET else "beats it, by less than the target" if gain > 0
                   else "does not hold")
        lines.append(f"- *{label} beats the DistilGPT2-style student of the same size by >= {KNGPT2_TARGET:.0%}* — "
                     f"{verdict} here: held-out perplexity {k['perplexity']:.2f} vs {g['perplexity']:.2f} "
                     f"({abs(gain):.1%} {'lower' if gain > 0 else 'higher'}; {size}; one seed).")
        ck, cg = k.get("curve", []), g.get("curve", [])
        common = sorted({p["tokens"] for p in ck} & {p["tokens"] for p in cg})
        ahead = [x for x in common if next(p["perplexity"] for p in ck if p["tokens"] == x)
                 < next(p["perplexity"] for p in cg if p["tokens"] == x)]
        if common:
            lines.append(f"  Along the curve it is lower at {len(ahead)} of {len(common)} evaluation points "
                         f"(including the start, the teacher's initialisations: {ck[0]['perplexity']:.2f} vs "
                         f"{cg[0]['perplexity']:.2f}); it ends at {k['perplexity'] / t['perplexity']:.2f}x the "
                         f"teacher's perplexity.")
    room = 1 - t["perplexity"] / g["perplexity"]
    if room <= 0:
        lines.append(f"- Room: the DistilGPT2-style student ends *below* its teacher's perplexity ({g['perplexity']:.2f} "
                     f"vs {t['perplexity']:.2f}; every student does, likely because they train at a learning rate "
                     "decaying to zero, which the early-stopped teacher never did): half the depth costs nothing "
                     "that its training does not win back here, so a student of the same size has nothing left to "
                     f"win by keeping the depth; beating it by {KNGPT2_TARGET:.0%} would take a student {KNGPT2_TARGET:.0%} better than its teacher.")
    else:
        lines.append(f"- Room: the DistilGPT2-style student ends at {g['perplexity'] / t['perplexity']:.2f}x the "
                     f"teacher's perplexity ({t['perplexity']:.2f}); a student that matched the teacher exactly would "
                     f"beat it by {room:.1%}" + (f", so the {KNGPT2_TARGET:.0%} target is out of reach for any student "
                                                 "of this teacher" if room < KNGPT2_TARGET else "") + ".")
    curve = t.get("validation_curve")
    if curve:
        best = min(curve, key=lambda p: p["perplexity"])
        lines.append(f"- Depth at the teacher's best point (step {best['step']}, validation text): its half-depth copy "
                     f"scores {best['half_depth_perplexity'] / best['perplexity']:.2f}x the teacher's perplexity "
                     "before any training; after that point the teacher overfits its "
                     f"{d['data']['train_tokens']:,} training tokens (validation "
                     + ", ".join(f"{p['perplexity']:.1f}" for p in curve if p["step"] > best["step"]) + ").")
    lines.append(f"- Scale caveat: the teacher saw {t['tokens_seen']:,} tokens ({fmt_s(t['seconds'])} of training), so "
                 "its perplexity is far from GPT-2's and the students distil a weak teacher; the paper's numbers "
                 "(WikiText-103 perplexity after pre-training on OpenWebText) are not reproduced in absolute terms, "
                 "only the comparison at equal size and equal tokens is.")
    return lines


# -- benchmarks/README.md run-time table ---------------------------------------------------------

README_BEGIN, README_END = "<!-- accuracy-runs:begin -->", "<!-- accuracy-runs:end -->"


def update_readme(path: str, abls: list, lm: Optional[dict]) -> bool:
    """Rewrite the block between the markers in ``benchmarks/README.md`` with each study's command
    and measured wall time (the rest of the file is left alone)."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        return False
    rows = ["| study | command | measured run time | complete |", "|---|---|---|---|"]
    for label, d in [(f"KroneckerBERT ablation ({name})", a) for name, a in abls] + [("KnGPT2 vs DistilGPT2-style", lm)]:
        if d is not None:
            rows.append(f"| {label} | `{d['command']}` | {fmt_s(d.get('wall_seconds'))} "
                        f"(torch threads: {d['environment']['threads']}, {d['environment']['date']}) | "
                        f"{'yes' if d.get('complete') else 'no (partial)'} |")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + README_BEGIN + "\n" + "\n".join(rows) + "\n" + README_END + tail)
    return True


# -- the document -------------------------------------------------------------------------------


SPEED_RUNS = [  # (file stem, heading, command)
    ("speed_kronecker", "Kronecker layers vs dense",
     ".venv/bin/python benchmarks/bench_kronecker.py --markdown benchmarks/results/speed_kronecker.md "
     "--json benchmarks/results/speed_kronecker.json"),
    ("speed_models", "Whole models, glibc malloc defaults",
     ".venv/bin/python benchmarks/bench_models.py --repeats 3 --rounds 3 --markdown benchmarks/results/speed_models.md "
     "--json benchmarks/results/speed_models.json"),
    ("speed_models_malloc", "Whole models, malloc keeping large blocks",
     ".venv/bin/python benchmarks/bench_models.py --repeats 3 --rounds 3 --malloc_large_blocks "
     "--markdown benchmarks/results/speed_models_malloc.md --json benchmarks/results/speed_models_malloc.json"),
]


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def kronecker_targets(rows: list) -> list[str]:
    """Issue #2's targets, checked on bench_kronecker's rows (forward: the optimised layer)."""
    out = ["| target | split | needed | measured | |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "linear" and r["why"].startswith("paper") and r["tokens"] == 1024:
            need = 0.7 * r["flop_ratio"]
            split = f"{r['n_in']}→{r['n_out']} A {r['a_shape'][0]}×{r['a_shape'][1]} ⊗ B {r['b_shape'][0]}×{r['b_shape'][1]}"
            out.append(f"| papers' split, forward at 1024 tokens ≥ 70% of the FLOP ratio | {split} | {need:.2f}x | "
                       f"{r['fwd_speedup']:.2f}x | {_verdict(r['fwd_speedup'] >= need)} |")
    lin = [r for r in rows if r["kind"] == "linear" and r["tokens"] >= 8]
    for bound, key, what in ((2, "fwd_speedup", "forward"), (4, "fb_speedup", "forward+backward")):
        sel = [r for r in lin if r["flop_ratio"] >= bound]
        if sel:
            worst = min(sel, key=lambda r: r[key])
            split = f"A {worst['a_shape'][0]}×{worst['a_shape'][1]}, {worst['tokens']} tokens"
            out.append(f"| FLOP ratio ≥ {bound}: {what} faster than dense from 8 tokens (slowest case) | {split} | "
                       f"> 1x | {worst[key]:.2f}x | {_verdict(worst[key] > 1)} |")
        # splits whose ratio only rounds to the bound (A 2x2: 1.99, the A-stage's few FLOPs) are
        # listed too rather than left out on a technicality
        near = [r for r in lin if bound - 0.05 <= r["flop_ratio"] < bound]
        if near:
            worst = min(near, key=lambda r: r[key])
            split = (f"A {worst['a_shape'][0]}×{worst['a_shape'][1]} (FLOP ratio {worst['flop_ratio']:.3f}), "
                     f"{worst['tokens']} tokens")
            out.append(f"| same, for the split whose ratio rounds to {bound} (slowest case) | {split} | > 1x | "
                       f"{worst[key]:.2f}x | {_verdict(worst[key] > 1)} |")
    return out


def model_targets(d: dict) -> list[str]:
    """Issue #7's speed and checkpoint targets, checked on one bench_models run."""
    rows = {r["model"]: r for r in d["rows"]}
    out = ["| target | needed | measured (range over rounds) | |", "|---|---|---|---|"]

    def ratio(base, name, col):
        """base / model on the medians, and per round (the rounds ran the models in alternation)."""
        b, m = rows[base], rows[name]
        per = [x / y for x, y in zip(b.get(col + "_rounds", []), m.get(col + "_rounds", []))]
        spread = f" ({min(per):.3f}-{max(per):.3f})" if len(per) > 1 else ""
        return b[col] / m[col], spread

    for base, label in (("bert-base", "BERT-base"),
                        ("bert-base-kn-layers", "BERT-base on this library's layer code (reference)")):
        if base not in rows:
            continue
        for name, need in (("kroneckerbert8", 2.5), ("kroneckerbert21", 4.0)):
            if name in rows:
                x, spread = ratio(base, name, "forward_s")
                out.append(f"| {name} (optimised) forward vs {label} | ≥ {need}x | {x:.3f}x{spread} | "
                           f"{_verdict(x >= need)} |")
            if name + "-default" in rows:
                x, spread = ratio(base, name + "-default", "forward_s")
                out.append(f"| {name}, default path (not a target) | | {x:.3f}x{spread} | |")
    six = rows.get("gpt2-6-layer")
    for name in ("kngpt2-distil-size-dense-head", "kngpt2-distil-size-tied-head"):
        if six and name in rows:
            for col, what in (("prefill_s", "prefill"), ("generate_s", "generation")):
                x, spread = ratio("gpt2-6-layer", name, col)
                out.append(f"| {name} ({rows[name]['parameters'] / 1e6:.1f}M, optimised) {what} vs the 6-layer "
                           f"GPT-2 ({six['parameters'] / 1e6:.1f}M) | ≥ 1.00x | {x:.3f}x{spread} | {_verdict(x >= 1)} |")
                if name + "-default" in rows:
                    x, spread = ratio("gpt2-6-layer", name + "-default", col)
                    out.append(f"| {name}, default path (not a target) | | {x:.3f}x{spread} | |")
    worst = max(d["rows"], key=lambda r: abs(r["checkpoint_vs_params_x4"] - 1))
    dev = abs(worst["checkpoint_vs_params_x4"] - 1)
    out.append(f"| every checkpoint within 2% of parameters x 4 bytes (worst: {worst['model']}) | ≤ 2% | "
               f"{100 * dev:.2f}% | {_verdict(dev <= 0.02)} |")
    return out


def speed_section(results_dir: str) -> list[str]:
    doc = []
    for stem, heading, command in SPEED_RUNS:
        md = os.path.join(results_dir, stem + ".md")
        if not os.path.exists(md):
            doc += [f"### {heading}", "", f"_Not run yet: `{command}`._", ""]
            continue
        with open(md) as f:
            doc += [f"### {heading}", "", "```bash", command, "```", "", f.read().strip(), ""]
        data = load(os.path.join(results_dir, stem + ".json"))
        if data is None:
            continue
        doc += ["Targets, checked by `make_results.py` on these numbers:", ""]
        doc += (kronecker_targets(data) if stem == "speed_kronecker" else model_targets(data)) + [""]
    if any(os.path.exists(os.path.join(results_dir, f"{stem}.json")) for stem in ("speed_models", "speed_models_malloc")):
        doc += ["How to read the BERT rows: `bert-base` is Transformers' `BertModel`; `bert-base-kn-layers` is the "
                "same dense model computed by this library's layer code (`KroneckerBertModel` without factors: FFN "
                "in blocks of 1024 tokens, in-place GELU), so the ratio of a KroneckerBERT to it is what the "
                "Kronecker factors alone give, and the ratio to `bert-base` is what a user switching models gets. "
                "The layer code matters most under glibc's default malloc, which maps every block over 32 MB "
                "afresh (a 50 MB FFN activation per layer at 32×128 tokens, page-faulted each time); with large "
                "blocks kept, the two BERT-base rows are level. The measured value of a target is the ratio of the "
                "medians; the range is the ratio within each round (the models of a round ran back to back), a "
                "measure of the run-to-run spread: a value within a few percent of its target is not settled by "
                "one run.", ""]
        doc += ["Why the tied-head KnGPT2 cannot beat the 6-layer GPT-2 at equal size: a Kronecker layer costs at "
                "least as many multiply-adds per token as it has parameters (for `A m1×n1 ⊗ B m2×n2` they are "
                "`m2·n1·(n2 + m1)` against `m1·n1 + m2·n2`), like a dense layer. With the embedding compressed "
                "(tied, factored head) most of the 81.9M budget has to sit in the 12 layers, so they carry the "
                "6-layer model's layer FLOPs and bytes and twice its per-block work (attention, LayerNorms, "
                "activations, framework overhead): generation at batch 1, which reads every layer's weights per "
                "token, is slower. The dense-head model spends its budget on the embedding, which costs a lookup, "
                "and its 12 layers hold ~3.7M parameters: it is faster in both.", ""]
    return doc


ONNX_COMMAND = ("HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_onnx.py --threads 2 "
                "--json benchmarks/results/speed_onnx.json")


def onnx_section(d: Optional[dict]) -> list[str]:
    """Serving: PyTorch vs ONNX Runtime fp32 / int8 latency, and what int8 costs in accuracy (issue #17)."""
    doc = ["### Serving: PyTorch vs ONNX Runtime fp32 and int8", ""]
    if d is None:
        return doc + [f"_Not run yet: `{ONNX_COMMAND}`._", ""]
    doc += ["```bash", d.get("command_line", ONNX_COMMAND), "```", "",
            f"{d['cpu']}, {d['threads']} threads, torch {d['torch']}, onnxruntime {d['onnxruntime']}; median of "
            f"{d['repeats']} calls per round, median over {d['rounds']} rounds run in alternation; sequence "
            f"classification, every token real (no padding). Speed-up = BERT-base's time / the model's time in "
            f"the same engine. ONNX graphs from `export_onnx` (factored: two contractions per Kronecker layer); "
            f"int8 = `quantize_onnx` (ONNX Runtime dynamic quantisation of the matmuls whose weight has both "
            f"dimensions ≥ 32, after ONNX Runtime's pre-processing); \"int8 vs own fp32\" = the model's fp32 time / "
            f"its int8 time; PyTorch runs Kronecker models after `optimize_for_inference`. Run time "
            f"{d['minutes']:.1f} min.", "",
            "| model | params | ONNX fp32 / int8 MiB | batch × tokens | PyTorch ms | ORT fp32 ms | ORT int8 ms | "
            "speed-up PyTorch | speed-up ORT fp32 | speed-up ORT int8 | int8 vs own fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        doc.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['bytes_fp32'] / 2**20:.1f} / "
                   f"{r['bytes_int8'] / 2**20:.1f} | {r['batch']} × {r['tokens']} | {1e3 * r['pytorch_s']:.1f} | "
                   f"{1e3 * r['ort-fp32_s']:.1f} | {1e3 * r['ort-int8_s']:.1f} | "
                   f"{r['pytorch_speedup_vs_bert_base']:.2f}x | {r['ort-fp32_speedup_vs_bert_base']:.2f}x | "
                   f"{r['ort-int8_speedup_vs_bert_base']:.2f}x | {r['ort-fp32_s'] / r['ort-int8_s']:.2f}x |")
    doc += ["", "Targets, checked by `make_results.py` on these numbers:", "",
            "| target | needed | measured | |", "|---|---|---|---|"]
    for r in d["rows"]:
        need = {"kroneckerbert8": 2.5, "kroneckerbert21": 4.0}.get(r["model"])
        if need:
            x = r["ort-fp32_speedup_vs_bert_base"]
            doc.append(f"| {r['model']} vs BERT-base, both ONNX Runtime fp32, {r['batch']} × {r['tokens']} | "
                       f"≥ {need}x | {x:.2f}x | {_verdict(x >= need)} |")
    acc = d.get("int8_accuracy")
    if acc:
        cost = acc["ort-fp32_accuracy"] - acc["ort-int8_accuracy"]
        doc.append(f"| int8 costs at most 1 point of SST-2 dev accuracy (demo student) | ≤ 0.010 | {cost:+.4f} | "
                   f"{_verdict(cost <= 0.010)} |")
        doc += ["", f"int8 accuracy check: the demo's SST-2 student ({acc['student']}), {acc['dev_rows']} dev "
                f"sentences: PyTorch {acc['pytorch_accuracy']:.4f}, ONNX Runtime fp32 {acc['ort-fp32_accuracy']:.4f}, "
                f"int8 {acc['ort-int8_accuracy']:.4f}; int8 and fp32 predict the same class for "
                f"{100 * acc['int8_agreement_with_fp32']:.1f}% of the sentences; ONNX file "
                f"{acc['bytes_fp32'] / 2**20:.1f} MiB fp32, {acc['bytes_int8'] / 2**20:.1f} MiB int8."]
    return doc + [""]


SCALE_COMMAND = ("HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kroneckerize_scale.py "
                 "--json benchmarks/results/scale_kroneckerize.json")


def scale_section(d: Optional[dict]) -> list[str]:
    """``kroneckerize`` on a ~0.5B Llama-shaped model: time and peak memory (issue #15)."""
    doc = ["### Scale: `kroneckerize` on a 0.5B-parameter Llama-shaped model", ""]
    if d is None:
        return doc + [f"_Not run yet: `{SCALE_COMMAND}`._", ""]
    import bench_kroneckerize_scale  # benchmarks/, next to this file: one table format

    ratio = d["measured_peak_bytes"] / d["expected_peak_bytes"]
    return doc + ["```bash", SCALE_COMMAND, "```", "",
                  "Each step in a fresh process; peak = the process's resident high-water mark (`VmHWM`) minus its "
                  "resident memory after imports. The dense checkpoint is memory-mapped by `from_pretrained` and "
                  "every weight is read once, so that it counts.", "",
                  bench_kroneckerize_scale.markdown(d), "",
                  "| target | needed | measured | |", "|---|---|---|---|",
                  f"| peak of load + `kroneckerize` ≈ dense + compressed + one SVD | ≤ 1.1x | {ratio:.2f}x | "
                  f"{_verdict(ratio <= 1.1)} |",
                  f"| fits in this machine's 24 GiB | < 24 GiB | {d['measured_peak_bytes'] / 2 ** 30:.2f} GiB | "
                  f"{_verdict(d['measured_peak_bytes'] < 24 * 2 ** 30)} |", ""]


INIT_LABEL = {"svd": "(a) Kronecker, papers' SVD init, uniform splits",
              "activation": "(b) Kronecker, activation-aware, uniform splits",
              "activation+budget": "(c) Kronecker, activation-aware, global budget",
              "low-rank": "(d) low-rank U·V, SVD",
              "low-rank+activation": "(e) low-rank U·V, activation-aware (whitened SVD)"}


def init_chart(d: dict, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = [m for m in ("gpt2", "minilm") if d.get("models", {}).get(m, {}).get("runs")]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.3), squeeze=False)
    colors = {"svd": "#4C72B0", "activation": "#DD8452", "activation+budget": "#C44E52", "low-rank": "#55A868",
              "low-rank+activation": "#8172B3"}
    for ax, name in zip(axes[0], models):
        m = d["models"][name]
        for method in INIT_LABEL:
            runs = sorted((r for r in m["runs"] if r["method"] == method), key=lambda r: r["fraction"])
            if not runs:
                continue
            xs = [r["fraction"] for r in runs]
            ax.plot(xs, [r["at_conversion"] for r in runs], marker="o", color=colors[method], ls=":",
                    label=f"{method}, at conversion")
            ax.plot(xs, [r["after_ilkd"] for r in runs], marker="s", color=colors[method],
                    label=f"{method}, after {d['budgets']['ilkd_steps']} ILKD steps")
        ax.axhline(m["teacher_score"], color="black", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["fraction"] for r in m["runs"]}))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{f:.0%}" for f in sorted({r["fraction"] for r in m["runs"]})])
        ax.set_xlabel("parameters kept in the targeted matrices")
        if name == "gpt2":
            ax.set_yscale("log")
            ax.set_ylabel("held-out perplexity (log; lower is better)")
        else:
            ax.set_ylabel("SST-2 dev accuracy")
        ax.set_title(m["teacher"], fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def init_section(d: Optional[dict], chart: Optional[str]) -> list[str]:
    out = ["## Initialisation: the papers' SVD, activation-aware, a global budget, and low-rank at equal size", ""]
    if not d:
        return out + ["Not run yet: `HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/study_init.py --threads 2`.", ""]
    b, env = d["budgets"], d["environment"]
    out += [f"`{d['command']}` ({fmt_s(d.get('wall_seconds'))}, {env.get('cpu', '?')}, torch threads "
            f"{env['threads']}, {env['date']}{'' if d.get('complete') else ', **incomplete**'}). Every linear of the "
            f"base model targeted (embedding and heads dense); calibration on {b['calibration_samples']} training "
            f"sequences the metric never sees; ILKD: {b['ilkd_steps']} steps, batch {b['ilkd_batch_size']}, lr "
            f"{b['ilkd_lr']}, `distill_preset=\"kngpt2\"`, the same for every method; budget ranks up to "
            f"{b['max_rank']}; one seed ({b['seed']}).", ""]
    if chart:
        out += [f"![init study]({rel(chart)})", ""]
    for name in ("gpt2", "minilm"):
        m = d.get("models", {}).get(name)
        if not m or not m.get("runs"):
            continue
        fractions = sorted({r["fraction"] for r in m["runs"]}, reverse=True)
        out += [f"**{m['teacher']}** — {m['metric']}; teacher {m['teacher_score']:.4f}; "
                f"{m['targeted_matrices']} matrices, {m['targeted_params']:,} parameters targeted.", "",
                "| method | " + " | ".join(f"{f:.0%}: at conversion | {f:.0%}: after ILKD" for f in fractions) + " |",
                "|---|" + "---|---|" * len(fractions)]
        for method, label in INIT_LABEL.items():
            cells = []
            for f in fractions:
                r = next((r for r in m["runs"] if r["method"] == method and r["fraction"] == f), None)
                cells += ["-", "-"] if r is None else [f"{r['at_conversion']:.4g} (kept {r['kept_fraction']:.3f})",
                                                       f"{r['after_ilkd']:.4g}"]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
        out += init_reading(name, m)
    return out


def outer_product_share(run: Optional[dict]) -> Optional[tuple[int, int, float]]:
    """``(matrices, of matrices, share of parameters)`` a budget run put on outer-product splits:
    ``A m1×n1 ⊗ B m2×n2`` with ``m1 = n2 = 1`` or ``n1 = m2 = 1`` is a rank-``r`` matrix ``U·V``."""
    choices = [c for c in (run or {}).get("choices", []) if c.get("b_shape") and c.get("params")]
    if not choices:
        return None
    outer = [c for c in choices if (c["a_shape"][0] == 1 and c["b_shape"][1] == 1)
             or (c["a_shape"][1] == 1 and c["b_shape"][0] == 1)]
    return len(outer), len(choices), sum(c["params"] for c in outer) / sum(c["params"] for c in choices)


def init_reading(name: str, m: dict) -> list[str]:
    """The issue's targets and which structure wins, in sentences chosen from the numbers."""
    runs = {(r["method"], r["fraction"]): r for r in m["runs"]}
    t = m["teacher_score"]
    lower = name == "gpt2"  # perplexity: lower is better
    better = (lambda x, y: x < y) if lower else (lambda x, y: x > y)
    out = []
    a, c = runs.get(("svd", 0.25)), runs.get(("activation+budget", 0.25))
    if lower and a and c:
        ex_a, ex_c = a["at_conversion"] - t, c["at_conversion"] - t
        ok = ex_c <= 0.5 * ex_a
        out.append(f"- Target (excess perplexity of (c) at most half of (a)'s at 25%, right after conversion): "
                   f"{ex_c:.1f} vs {ex_a:.1f} ({ex_c / ex_a:.2f}x): **{'met' if ok else 'not met'}**; after ILKD "
                   f"{c['after_ilkd']:.1f} vs {a['after_ilkd']:.1f}: (c) "
                   f"{'still ahead' if c['after_ilkd'] < a['after_ilkd'] else 'not ahead'}.")
    for f in sorted({r["fraction"] for r in m["runs"]}, reverse=True):
        share = outer_product_share(runs.get(("activation+budget", f)))
        if share is not None:
            out.append(f"- {f:.0%}: the budget put {share[0]} of {share[1]} matrices ({share[2]:.0%} of its parameters) "
                       "on an outer-product split (`A m×1 ⊗ B 1×n`: plain low rank), the rest on true Kronecker splits.")
        best_k = min((runs[(k, f)] for k in ("svd", "activation", "activation+budget") if (k, f) in runs),
                     key=lambda r: r["after_ilkd"] if lower else -r["after_ilkd"], default=None)
        best_l = min((runs[(k, f)] for k in ("low-rank", "low-rank+activation") if (k, f) in runs),
                     key=lambda r: r["after_ilkd"] if lower else -r["after_ilkd"], default=None)
        if best_k and best_l:
            x, y = best_k["after_ilkd"], best_l["after_ilkd"]
            if lower:  # one seed: call a perplexity gap under 1% level
                level, gap = abs(x - y) < 0.01 * min(x, y), f"{abs(x - y) / min(x, y):.1%}"
            else:  # dev accuracy: two binomial standard errors of the difference
                n = m.get("dev_rows") or 872
                p = (x + y) / 2
                level, gap = abs(x - y) < 2 * (2 * p * (1 - p) / n) ** 0.5, f"{abs(x - y):.4f}"
            verdict = "level (within one seed's noise)" if level else (
                "the Kronecker family ahead" if better(x, y) else "pure low-rank ahead")
            b, e = runs.get(("activation", f)), runs.get(("low-rank+activation", f))
            if b and e:
                out.append(f"- {f:.0%}, after ILKD, one structure everywhere at the same data-aware objective: "
                           f"Kronecker (b) {b['after_ilkd']:.4g}, low-rank (e) {e['after_ilkd']:.4g}: "
                           f"**{'Kronecker' if better(b['after_ilkd'], e['after_ilkd']) else 'low-rank'} ahead**.")
            out.append(f"- {f:.0%}, after ILKD: best of (a)–(c) `{best_k['method']}` {x:.4g}, best pure low-rank "
                       f"`{best_l['method']}` {y:.4g} (gap {gap}): **{verdict}**.")
    return out + [""]


def run_glue_section(d: Optional[dict], title: str = "") -> list[str]:
    """The README's GLUE command with a teacher (the default recipe) against labels alone, over seeds."""
    out = [title or "## Accuracy 3: the README's `kn-transformers glue` command, as a user runs it", ""]
    if not d:
        return out + ["Not run yet: `benchmarks/study_run_glue.py` writes `benchmarks/results/run_glue_readme.json`.", ""]
    env = d["environment"]
    t = d["teacher"]
    majority = max(constant_scores(d["task"], {"metric": "accuracy"}), default=None)
    out += [f"`{d['command']}` ({fmt_s(d.get('wall_seconds'))}, {env.get('cpu', '?')}, torch threads "
            f"{env['threads']}, {env['date']}). Teacher: the bundled MiniLM-L6-H384 fine-tuned by `run_glue.py` on the "
            f"first {d['train_rows']:,} {TASK_LABEL.get(d['task'], d['task'])} training rows, dev accuracy {t['accuracy']:.4f}. Each "
            f"student: `{d['readme_flags']}` on the same rows, `--preset P`, with `--teacher_model_name_or_path` "
            + (f"and `{d['recipe_flags']}` " if d.get("recipe_flags") else "")
            + "(every other setting `run_glue`'s default: the recommended recipe) "
            + "or without it (labels alone); "
            f"seeds {d['seeds']}, mean ± standard deviation of the dev accuracy"
            + (f" (majority class {majority:.4f})." if majority is not None else "."), ""]
    if not d.get("complete"):
        out += ["**Partial run**: missing rows were not measured.", ""]
    out += reproduce_line(d)
    if d.get("note"):
        out += [d["note"], ""]
    out += ["| preset | recipe (with teacher) | labels alone | difference | two standard errors | retention (recipe) |",
            "|---|---|---|---|---|---|"]
    for preset, v in d["students"].items():
        r, lab = v.get("recipe"), v.get("labels")
        cells = [("not run" if not x else f"{x['mean']:.4f}" if x["std"] is None else f"{x['mean']:.4f} ± {x['std']:.4f}")
                 for x in (r, lab)]
        if r and lab and r["std"] is not None and lab["std"] is not None:
            diff = r["mean"] - lab["mean"]
            se2 = two_standard_errors(r["scores"], lab["scores"])
            cells += [f"{diff:+.4f}", f"{se2:.4f} ({'beyond' if diff > se2 else 'within'} noise)"]
        else:
            cells += ["", ""]
        cells.append(f"{r['mean'] / t['accuracy']:.1%}" if r else "")
        out.append(f"| {preset} | " + " | ".join(cells) + " |")
    return out + [""]


def main(argv=None) -> str:
    args = parse_args(argv)
    _DOC_DIR[0] = os.path.dirname(os.path.abspath(args.output))
    # every run of the ablation: kroneckerbert_ablation*.json, and kroneckerbert{8,21}_ablation*.json (one preset)
    names = sorted(f[:-5] for f in os.listdir(args.results_dir)
                   if f.startswith("kroneckerbert") and "_ablation" in f and f.endswith(".json"))
    # the headline is the recommended recipe's runs; the other runs follow in name order
    headlines = [n for n in HEADLINE_ABLATIONS if n in names]
    names = headlines + [n for n in names if n not in headlines]
    abls = [(n, load(os.path.join(args.results_dir, n + ".json"))) for n in names]
    lm = load(os.path.join(args.results_dir, "kngpt2_vs_distilgpt2.json"))
    charts = {n: None if a["budgets"].get("teachers_only") else
              ablation_chart(a, os.path.join(args.results_dir, n + ".png")) for n, a in abls}
    lm_chart = curve_chart(lm, os.path.join(args.results_dir, "kngpt2_perplexity.png")) if lm else None

    doc = ["# Results", "",
           "<!-- Generated by benchmarks/make_results.py from benchmarks/results/*.json; do not edit by hand. -->", "",
           "Everything below is measured on this project's CPU machine (2 cores) by the commands shown; "
           "regenerate this file with `.venv/bin/python benchmarks/make_results.py`. "
           "`benchmarks/README.md` lists every command with its run time.", "",
           "## Speed and memory", ""]
    doc += speed_section(args.results_dir)
    doc += onnx_section(load(os.path.join(args.results_dir, "speed_onnx.json")))
    doc += scale_section(load(os.path.join(args.results_dir, "scale_kroneckerize.json")))
    if headlines:
        doc += per_preset_heading("## Accuracy 1: the recommended recipe, KroneckerBERT ablation (paper Table 6)")
        for n, a in abls[:len(headlines)]:
            doc += ablation_section(a, charts[n], title=preset_run_title(n, a["budgets"]["presets"]))
    elif abls:
        doc += ablation_section(abls[0][1], charts[abls[0][0]])
    else:
        doc += ablation_section(None, None)
    reference = headline_reference([a for _, a in abls[:len(headlines)]])
    for n, a in abls[max(len(headlines), 1):]:
        doc += ablation_section(a, charts[n], title=f"### {other_run_title(n, a, reference)}")
    doc += kngpt2_section(lm, lm_chart)
    init = load(os.path.join(args.results_dir, "init_study.json"))
    init_png = init_chart(init, os.path.join(args.results_dir, "init_study.png")) if init else None
    doc += init_section(init, init_png)
    readme_runs = [(n, load(os.path.join(args.results_dir, n + ".json"))) for n in README_COMMAND_RUNS]
    readme_runs = [(n, d) for n, d in readme_runs if d]
    if readme_runs:
        doc += per_preset_heading("## Accuracy 3: the README's `kn-transformers glue` command, as a user runs it")
        for n, d in readme_runs:
            doc += run_glue_section(d, title=preset_run_title(n, d["presets"]))
    else:
        doc += run_glue_section(load(os.path.join(args.results_dir, "run_glue_readme.json")))
    # earlier README commands (run_glue_readme_*.json): what a user got before the example changed
    for name in sorted(f for f in os.listdir(args.results_dir) if f.startswith("run_glue_readme_") and f.endswith(".json")
                       and f[:-5] not in README_COMMAND_RUNS):
        d = load(os.path.join(args.results_dir, name))
        doc += run_glue_section(d, title=f"### Earlier README command: {d['train_rows']:,} rows, `{d['readme_flags']}`")
    # the same command over more seeds (run_glue_seeds_*.json), where three could not resolve the difference
    for name in sorted(f for f in os.listdir(args.results_dir) if f.startswith("run_glue_seeds_") and f.endswith(".json")):
        d = load(os.path.join(args.results_dir, name))
        doc += run_glue_section(d, title=f"### Later run: the README command over {len(d['seeds'])} seeds (`{name}`)")
    reading = []
    for n, a in abls:
        r = ablation_reading(a)
        if r:
            b = a["budgets"]
            reading += [f"KroneckerBERT ablation, `{n}.json` (student steps {b['student_steps']}, stage-1 steps "
                        f"{b['stage1_steps']}):", ""] + r + [""]
    r = kngpt2_reading(lm)
    if r:
        reading += ["KnGPT2 vs DistilGPT2-style:", ""] + r
    doc += ["## Honest reading (generated from the numbers above)", ""]
    doc += reading or ["No accuracy results yet."]
    doc += ["", "Every sentence above is selected by comparing the measured numbers in the JSON files; a different "
            "run can flip any of them. Single seed and small budgets: a difference smaller than two standard errors "
            "of the dev metric (binomial for accuracy, 2/sqrt(n) for Matthews correlation) is not evidence either "
            "way.", ""]
    text = "\n".join(doc)
    with open(args.output, "w") as f:
        f.write(text)
    if os.path.abspath(args.results_dir) == os.path.abspath(RESULTS):
        update_readme(os.path.join(ROOT, "benchmarks", "README.md"), abls, lm)
    print(f"wrote {args.output}" + "".join(f", {p}" for p in list(charts.values()) + [lm_chart, init_png] if p))
    return text


if __name__ == "__main__":
    main()
