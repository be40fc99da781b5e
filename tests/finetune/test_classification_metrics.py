import json

import pytest

from minigpt.finetune.metrics import classification_report, confusion_matrix, write_report


def test_report_matches_a_hand_computation():
    # 3 classes, 10 rows. true: a a a a b b b c c c ; pred: a a b c b b a c c a
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 0]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r.confusion == ((2, 1, 1), (1, 2, 0), (1, 0, 2))
    assert r.accuracy == pytest.approx(6 / 10)
    # a: TP=2, predicted a = 4, support 4 -> P=1/2, R=1/2, F1=1/2
    # b: TP=2, predicted b = 3, support 3 -> P=2/3, R=2/3, F1=2/3
    # c: TP=2, predicted c = 3, support 3 -> P=2/3, R=2/3, F1=2/3
    a, b, c = r.per_class
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((0.5, 0.5, 0.5, 4))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((2 / 3, 2 / 3, 2 / 3, 3))
    assert (c.precision, c.recall) == pytest.approx((2 / 3, 2 / 3))
    assert r.macro_f1 == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert r.majority_baseline == pytest.approx(0.4)


def test_unequal_precision_and_recall_and_a_never_predicted_class():
    # true: x x x y ; pred: x x y y  -> x: P=1, R=2/3, F1=0.8 ; y: P=1/2, R=1, F1=2/3
    r = classification_report([0, 0, 0, 1], [0, 0, 1, 1], ["x", "y"])
    x, y = r.per_class
    assert (x.precision, x.recall, x.f1) == pytest.approx((1.0, 2 / 3, 0.8))
    assert (y.precision, y.recall, y.f1) == pytest.approx((0.5, 1.0, 2 / 3))
    # A class never predicted has precision 0 by convention, not a division error.
    r = classification_report([0, 1], [0, 0], ["x", "y"])
    assert r.per_class[1].precision == 0.0 and r.per_class[1].f1 == 0.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="entries"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="class ids must be in 0..1"):
        confusion_matrix([0, 2], [0, 0], 2)
    with pytest.raises(ValueError, match="no rows"):
        classification_report([], [], ["a", "b"])


def test_written_report_has_json_table_and_png(tmp_path):
    r = classification_report([0, 1, 1, 2], [0, 1, 2, 2], ["neg", "pos", "neutral"])
    write_report(r, tmp_path, extra={"model": "m"})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == 0.75 and metrics["n"] == 4 and metrics["model"] == "m"
    text = (tmp_path / "report.txt").read_text()
    assert "macro avg" in text and "neutral" in text and "confusion matrix" in text
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
