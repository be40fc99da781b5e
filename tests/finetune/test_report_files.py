"""One writer of evaluation folders (`finetune.metrics.write_report`) for every report kind."""
import json

from minigpt.finetune.as_completion import AsCompletionReport
from minigpt.finetune.completion import CompletionReport
from minigpt.finetune.metrics import classification_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_as_completion_report_writes_label_scores_exact_match_and_its_confusion_matrix(tmp_path):
    likelihood = classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    write_report(AsCompletionReport(likelihood, exact_match=0.5, not_a_label=1), tmp_path, {"model": "m"})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == likelihood.accuracy and metrics["exact_match"] == 0.5
    assert metrics["not_a_label"] == 1 and metrics["scored_by"] == "label log-likelihood" and metrics["model"] == "m"
    assert "greedy completion exact match 0.5000" in (tmp_path / "report.txt").read_text()
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == PNG


def test_completion_report_writes_json_and_text_but_no_confusion_matrix(tmp_path):
    report = CompletionReport(loss=1.25, perplexity=3.49, tokens=40, exact_match=0.25, generated=4)
    write_report(report, tmp_path / "eval", {"task": "completion"})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["loss"] == 1.25 and metrics["exact_match"] == 0.25 and metrics["task"] == "completion"
    assert "exact match 0.250 on 4 greedy completions" in (tmp_path / "eval" / "report.txt").read_text()
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists()
