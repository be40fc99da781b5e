"""scripts/sst2_eval_files.py writes the README Evaluation run's task files, in the formats
`minigpt eval` reads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from minigpt.evaluation.tasks import read_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sst2_eval_files.py"


def _script():
    spec = importlib.util.spec_from_file_location("sst2_eval_files", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows), encoding="utf-8")


def test_writes_four_files_that_minigpt_eval_reads(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _csv(data / "train.csv", [("a fine film .", "positive"), ("caf\u00e9 noise .", "negative")])
    _csv(data / "validation.csv", [("dull and overlong .", "negative"), ("a gem , 10 / 10 .", "positive"),
                                   ("na\u00efve .", "positive")])
    counts = _script().write_files(data, tmp_path / "out")
    out = tmp_path / "out"
    assert counts == {"sst2_train.txt": 1, "sst2_validation.jsonl": 2, "sst2_lastword.jsonl": 1,
                      "sst2_generate.jsonl": 2}  # non-ASCII rows dropped; "10" is not a word
    assert (out / "sst2_train.txt").read_text() == "Review: a fine film .\nSentiment: positive\n"
    first = json.loads((out / "sst2_validation.jsonl").read_text().splitlines()[0])
    assert first == {"context": "Review: dull and overlong .\nSentiment:", "choices": ["negative", "positive"],
                     "label": 0}
    assert json.loads((out / "sst2_lastword.jsonl").read_text()) == {"text": "dull and overlong"}
    kinds = {name: read_task(out / name).kind for name in ("sst2_validation.jsonl", "sst2_lastword.jsonl",
                                                           "sst2_generate.jsonl")}
    assert len(set(kinds.values())) == 3, kinds


def test_an_unknown_label_is_an_error_naming_it(tmp_path):
    _csv(tmp_path / "train.csv", [("fine .", "great")])
    _csv(tmp_path / "validation.csv", [("fine .", "positive")])
    with pytest.raises(SystemExit, match="'great'"):
        _script().write_files(tmp_path, tmp_path / "out")
