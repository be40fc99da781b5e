"""Write the task files of the README's Evaluation "A real run" from the shared SST-2 copy.

    python scripts/sst2_eval_files.py [--data ../shared/data/sentiment] [--out .]

writes, from train.csv and validation.csv (rows with non-ASCII characters dropped: a
character tokenizer knows only what it was trained on):
- sst2_train.txt: every training row as "Review: <text>\\nSentiment: <label>", a blank line apart
  (the text `minigpt train` learns the format from);
- sst2_validation.jsonl: multiple choice, {"context": "Review: <text>\\nSentiment:",
  "choices": ["negative", "positive"], "label": 0 or 1};
- sst2_lastword.jsonl: cloze, {"text": <review without its final " .">}, only reviews whose last
  word before a final "." is alphabetic;
- sst2_generate.jsonl: free-form, {"prompt": "Review: <text>\\nSentiment:", "completion": " <label>"}.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

CHOICES = ["negative", "positive"]


def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(r["text"].strip(), r["label"].strip()) for r in csv.DictReader(f)]
    return [(text, label) for text, label in rows if text.isascii()]


def last_word_text(text: str) -> str | None:
    """The review without its final "." when the word before it is alphabetic, else None."""
    words = text.split()
    if len(words) >= 2 and words[-1] == ".":
        words = words[:-1]
    return " ".join(words) if len(words) >= 2 and words[-1].isalpha() else None


def write_files(data: Path, out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    train, val = read_rows(data / "train.csv"), read_rows(data / "validation.csv")
    for _, label in train + val:
        if label not in CHOICES:
            raise SystemExit(f"error: label {label!r} in {data}: expected one of {CHOICES}")
    (out / "sst2_train.txt").write_text(
        "\n\n".join(f"Review: {t}\nSentiment: {lab}" for t, lab in train) + "\n", encoding="utf-8")
    cloze = [c for c in (last_word_text(t) for t, _ in val) if c]
    files = {
        "sst2_validation.jsonl": [{"context": f"Review: {t}\nSentiment:", "choices": CHOICES,
                                   "label": CHOICES.index(lab)} for t, lab in val],
        "sst2_lastword.jsonl": [{"text": c} for c in cloze],
        "sst2_generate.jsonl": [{"prompt": f"Review: {t}\nSentiment:", "completion": f" {lab}"} for t, lab in val],
    }
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts = {"sst2_train.txt": len(train), **{name: len(rows) for name, rows in files.items()}}
    for name, n in counts.items():
        print(f"wrote {out / name}: {n} rows")
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/sentiment"),
                   help="folder holding SST-2's train.csv and validation.csv")
    p.add_argument("--out", type=Path, default=Path("."), help="folder to write the four files into")
    args = p.parse_args(argv)
    write_files(args.data, args.out)


if __name__ == "__main__":
    main()
