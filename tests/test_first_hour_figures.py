"""scripts/first_hour.py records the figures the README quotes beside the fine-tunes': the
pretraining run's last validation loss and the few-shot baseline's accuracy."""
import json

from scripts.first_hour import other_figures, to_markdown


def test_pretraining_loss_and_fewshot_accuracy_are_recorded(tmp_path):
    (tmp_path / "runs" / "lm").mkdir(parents=True)
    (tmp_path / "runs" / "lm" / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 150, "val_loss": 7.1}\n{"kind": "train", "step": 300, "loss": 6.9}\n'
        '{"kind": "eval", "step": 300, "val_loss": 6.82}\n')
    (tmp_path / "runs" / "fs").mkdir()
    (tmp_path / "runs" / "fs" / "metrics.json").write_text(
        json.dumps({"accuracy": 0.515, "n": 200, "majority_baseline": 0.535}))
    steps = [{"command": "minigpt train --preset tiny-bpe --data corpus --out-dir runs/lm", "wall_s": 357.0},
             {"command": "minigpt fewshot runs/lm --shots s.csv --data v.csv --k 4 --limit 200 --out runs/fs",
              "wall_s": 4.0}]
    found = other_figures(steps, tmp_path)
    assert found["pretrain"] == [{"out": "runs/lm", "step": 300, "val_loss": 6.82, "wall_s": 357.0}]
    assert found["fewshot"][0]["accuracy"] == 0.515 and found["fewshot"][0]["k"] == "4"
    text = to_markdown({"machine": "m", "torch": "t", "note": "", "steps": steps, "total_s": 361.0,
                        "accuracy": [], **found})
    assert "| task |" not in text  # no empty accuracy table
    assert "validation loss 6.820 at update 300" in text and "accuracy 0.515 on 200 rows" in text
