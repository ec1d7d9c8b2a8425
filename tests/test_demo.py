"""The README's main job on a reduced budget: the real MiniLM teacher, the shipped SST-2 sample."""

import json

import pytest

from kn_transformers.demo import DemoConfig, run_demo, sst2_sample


def test_the_shipped_sample_is_sst2():
    ds = sst2_sample()
    assert len(ds["train"]) == 2000 and len(ds["validation"]) == 872
    assert set(ds["validation"].column_names) == {"sentence", "label", "idx"}
    assert set(ds["train"]["label"]) == {0, 1}


@pytest.mark.integration
def test_ilkd_student_beats_the_labels_only_student_on_sst2(tmp_path, capsys):
    """Issue 5's acceptance on the real teacher: kroneckerbert8 distilled with the kroneckerbert
    loss reaches a higher SST-2 dev accuracy than the same student trained on labels alone."""
    # the shipped 2,000 rows, fewer epochs than the demo (measured: teacher 0.812, ILKD 0.783, labels 0.736)
    cfg = DemoConfig(output_dir=str(tmp_path), teacher_epochs=2, student_epochs=5)
    r = run_demo(cfg)
    t, s, b = r["teacher"]["accuracy"], r["student_ilkd"]["accuracy"], r["student_labels_only"]["accuracy"]
    print(f"\nSST-2 dev accuracy: teacher {t:.4f}, kroneckerbert8 + ILKD {s:.4f}, labels only {b:.4f}")
    assert t > 0.75  # a real pretrained teacher learns SST-2 from 1,000 sentences
    assert s > b
    assert r["teacher"]["parameters"] / r["student_ilkd"]["parameters"] > 2
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["student_ilkd"]["accuracy"] == s
    assert (tmp_path / "demo_chart.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| teacher (MiniLM-L6-H384, fine-tuned) |" in out
