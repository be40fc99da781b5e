import json

import pytest

from minigpt.finetune.check import check_prompt_completion
from tests.helpers import use_tiktoken_cache


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = [{"prompt": f"Q{i} ->", "completion": f" answer {i}\n"} for i in range(4)]


def test_a_clean_file_has_no_findings(tmp_path):
    report = check_prompt_completion(write_jsonl(tmp_path / "d.jsonl", GOOD))
    assert report.ok and len(report.kept) == 4
    assert report.separator == " ->" and report.stop == "\n"
    assert "no problems found" in report.format()


def test_each_row_defect_is_dropped_with_its_line_and_reason(tmp_path):
    lines = [
        GOOD[0],                                     # 1 ok
        "{not json",                                 # 2 invalid JSON
        {"prompt": "p ->"},                          # 3 missing completion
        {"completion": " c\n"},                      # 4 missing prompt
        {"prompt": "p ->", "completion": 5},         # 5 not a string
        {"prompt": "p ->", "completion": "  "},      # 6 empty completion
        GOOD[0],                                     # 7 duplicate of line 1
        "[1, 2]",                                    # 8 not an object
        GOOD[1],                                     # 9 ok
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    report = check_prompt_completion(path)
    reasons = {d.line: d.reason for d in report.dropped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in reasons[2]
    assert "missing field 'completion'" in reasons[3] and "missing field 'prompt'" in reasons[4]
    assert "strings" in reasons[5] and "empty completion" in reasons[6]
    assert reasons[7] == "duplicate of line 1" and "JSON object" in reasons[8]
    assert [r.line for r in report.kept] == [1, 9]
    text = report.format()
    for line in reasons:
        assert f"line {line}:" in text


def test_missing_separator_whitespace_and_stop_are_found_and_fixed(tmp_path, monkeypatch):
    rows = [{"prompt": "Title one", "completion": "Body one."},
            {"prompt": "Another title", "completion": " Body two!", "id": 7}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_prompt_completion(path)
    warnings = "\n".join(report.warnings)
    assert "common separator" in warnings and "\\n\\n###\\n\\n" in warnings
    assert "1 completions do not start with whitespace (lines 1)" in warnings
    assert "stop sequence" in warnings and "fields other than prompt/completion: ['id']" in warnings
    assert not report.dropped and report.written is None

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # without --out the copy goes to the current folder, not beside the input
    fixed = check_prompt_completion(path, fix=True)
    assert fixed.written == work / "d.fixed.jsonl" and not (tmp_path / "d.fixed.jsonl").exists()
    out = [json.loads(l) for l in fixed.written.read_text().splitlines()]
    assert out == [{"prompt": "Title one\n\n###\n\n", "completion": " Body one.\n"},
                   {"prompt": "Another title\n\n###\n\n", "completion": " Body two!\n"}]
    assert check_prompt_completion(fixed.written).ok


def test_suggested_separator_avoids_text_already_in_prompts(tmp_path):
    rows = [{"prompt": "a\n\n###\n\nb", "completion": " x\n"}, {"prompt": "c", "completion": " y\n"}]
    report = check_prompt_completion(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.separator == " ->"


def test_too_long_rows_are_dropped_and_listed(tmp_path, monkeypatch):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer

    rows = [{"prompt": "short ->", "completion": " yes\n"},
            {"prompt": "word " * 40 + "->", "completion": " no\n"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_prompt_completion(path, tokenizer=Tokenizer(), block_size=16, fix=True,
                                     out=tmp_path / "clean.jsonl")
    assert [d.line for d in report.dropped] == [2] and "too long" in report.dropped[0].reason
    assert "dropped rows:" in report.format() and "line 2: too long" in report.format()
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 1


def test_fix_appends_the_shared_separator_only_to_the_row_that_lacks_it(tmp_path):
    rows = [{"prompt": f"Review {i} ->", "completion": f" label {i}\n"} for i in range(5)]
    rows[2] = {"prompt": "Review 2", "completion": " label 2"}  # lacks the separator and the stop
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check_prompt_completion(path, fix=True, out=tmp_path / "clean.jsonl")
    assert report.separator == " ->" and report.stop == "\n"
    warnings = "\n".join(report.warnings)
    assert "4 of 5 prompts end with ' ->'; 1 do not (lines 3)" in warnings
    assert "4 of 5 completions end with '\\n'; 1 do not (lines 3)" in warnings
    out = [json.loads(l) for l in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in out] == [f"Review {i} ->" for i in range(5)]
    assert [r["completion"] for r in out] == [f" label {i}\n" for i in range(5)]
    assert "appended the separator ' ->' to 1 prompt (line 3)" in report.format()


def test_report_names_common_prefixes_and_the_separator_and_stop_it_suggests(tmp_path):
    rows = [{"prompt": f"Classify: text {i}", "completion": f"Answer: {w}"} for i, w in enumerate(["yes", "no"])]
    text = check_prompt_completion(write_jsonl(tmp_path / "d.jsonl", rows)).format()
    assert "all prompts start with 'Classify: text '" in text and "all completions start with 'Answer: '" in text
    assert "separator (end of every prompt; add it at inference): '\\n\\n###\\n\\n'" in text
    assert "stop sequence (end of every completion; pass as --stop): '\\n'" in text


def test_cli_check_exits_0_on_warnings_and_1_on_unusable_rows_and_fixes_into_the_cwd(tmp_path, monkeypatch, capsys):
    from minigpt.cli import main

    use_tiktoken_cache(monkeypatch)
    warned = tmp_path / "warned.csv"
    warned.write_text("question,answer\nQ1,A1\nQ2,A2\n")
    args = ["finetune", "check", str(warned), "--prompt-column", "question", "--completion-column", "answer",
            "--block-size", "64"]
    main(args)  # only warnings: no SystemExit
    assert "completions do not start with whitespace" in capsys.readouterr().out
    broken = write_jsonl(tmp_path / "broken.jsonl", [GOOD[0], "{not json"])
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "check", str(broken), "--block-size", "64"])
    assert exit_.value.code == 1 and "line 2: not valid JSON" in capsys.readouterr().out
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(args + ["--fix"])
    assert json.loads((work / "warned.fixed.jsonl").read_text().splitlines()[0]) == {
        "prompt": "Q1\n\n###\n\n", "completion": " A1\n"}



def test_sentence_punctuation_most_completions_end_with_is_not_taken_for_a_stop_sequence(tmp_path):
    rows = [{"prompt": f"Q{i} ->", "completion": f" Sentence {i}."} for i in range(4)]
    rows.append({"prompt": "Q9 ->", "completion": " No period"})
    report = check_prompt_completion(write_jsonl(tmp_path / "d.jsonl", rows), fix=True, out=tmp_path / "c.jsonl")
    assert report.stop == "\n"  # a new stop for every row, not "." for the last one
    out = [json.loads(l)["completion"] for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert out[-1] == " No period\n" and out[0] == " Sentence 0.\n"
