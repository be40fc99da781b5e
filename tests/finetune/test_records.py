"""The one reader of fine-tuning files: CSV, TSV, JSON array and JSONL mean the same rows."""
import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minigpt.finetune.check import check_prompt_completion
from minigpt.finetune.classify import LabeledText, read_labeled
from minigpt.finetune.completion import read_prompt_completion
from minigpt.finetune.records import read_records
from tests.helpers import DATA, need_file

ROWS = [
    {"prompt": "Capital of France ->", "completion": " Paris\n"},
    {"prompt": "Say \"hi\", politely ->", "completion": " Hello, there.\n"},  # quote and comma
    {"prompt": "Two lines\nof prompt ->", "completion": " café\n"},  # newline, non-ASCII
    {"prompt": "Capital of France ->", "completion": " Paris\n"},  # a duplicate
    {"prompt": "Tab\tinside ->", "completion": "no leading space\n"},
]


def write_all_formats(folder, rows, stem="d"):
    """The same rows as CSV, TSV, a JSON array and JSONL, written by the stdlib writers."""
    paths = {}
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        path = paths[fmt] = folder / f"{stem}.{fmt}"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "completion"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    paths["json"] = folder / f"{stem}.json"
    paths["json"].write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"] = folder / f"{stem}.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def test_csv_tsv_json_array_and_jsonl_with_the_same_rows_give_the_same_cleaned_jsonl(tmp_path):
    outputs = {}
    for fmt, path in write_all_formats(tmp_path, ROWS).items():
        report = check_prompt_completion(path, fix=True, out=tmp_path / f"clean_{fmt}.jsonl")
        assert [d.reason for d in report.dropped] == ["duplicate of line " + str(report.kept[0].line)], fmt
        outputs[fmt] = report.written.read_bytes()
    assert outputs["csv"] == outputs["tsv"] == outputs["json"] == outputs["jsonl"]
    cleaned = [json.loads(line) for line in outputs["csv"].decode().splitlines()]
    assert cleaned[1] == ROWS[1] and cleaned[2] == ROWS[2] and cleaned[3]["completion"] == " no leading space\n"


def test_real_headlines_rows_give_the_same_cleaned_jsonl_in_every_format(tmp_path):
    source = need_file(DATA / "headlines" / "validation.jsonl")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:200]]
    outputs = {fmt: check_prompt_completion(path, fix=True, out=tmp_path / f"clean_{fmt}.jsonl").written.read_bytes()
               for fmt, path in write_all_formats(tmp_path, rows).items()}
    assert len(set(outputs.values())) == 1 and len(outputs["csv"].splitlines()) == 200


def test_csv_with_a_quoted_comma_and_a_quoted_newline_round_trips(tmp_path):
    path = write_all_formats(tmp_path, ROWS[:3])["csv"]
    pairs = read_prompt_completion(path)
    assert [(p.prompt, p.completion) for p in pairs] == [(r["prompt"], r["completion"]) for r in ROWS[:3]]
    # A row's line is where it starts: row 3 begins on line 4 even though row 2 spans two lines
    # (its completion ends with a newline inside quotes).
    assert [p.line for p in pairs] == [2, 4, 6]


def test_a_csv_row_with_an_unquoted_comma_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngreat fun,positive\na gem of a film, truly,positive\ndull,negative\n")
    with pytest.raises(ValueError, match=r"reviews.csv:3: 3 fields but the header has 2 \(text, label\).*quoted"):
        read_labeled(path)
    (tmp_path / "short.tsv").write_text("prompt\tcompletion\nonly a prompt\n")
    with pytest.raises(ValueError, match=r"short.tsv:2: 1 fields but the header has 2.*tab"):
        check_prompt_completion(tmp_path / "short.tsv")


def test_a_missing_column_is_an_error_listing_the_columns_found(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nwhy?, because\n")
    with pytest.raises(ValueError, match=r"no column 'prompt' or 'completion'; the file has \['question', "
                                         r"'answer'\].*--prompt-column"):
        read_prompt_completion(path)
    assert read_prompt_completion(path, "question", "answer")[0].completion == " because"


def test_a_bom_in_a_csv_header_or_at_the_start_of_jsonl_is_dropped_and_the_first_row_kept(tmp_path):
    bom = "\ufeff"
    (tmp_path / "a.csv").write_text(bom + "text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    assert read_labeled(tmp_path / "a.csv") == [LabeledText("good", "pos", 2), LabeledText("bad", "neg", 3)]
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in ROWS[:2]), encoding="utf-8")
    report = check_prompt_completion(tmp_path / "a.jsonl")
    assert not report.dropped and [r.line for r in report.kept] == [1, 2]
    (tmp_path / "a.json").write_text(bom + json.dumps(ROWS[:2]), encoding="utf-8")
    assert len(read_prompt_completion(tmp_path / "a.json")) == 2


def test_a_latin1_file_is_an_error_naming_the_file_line_and_the_encoding_flag(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,pos\ncrème brûlée,pos\nbad,neg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv: line 3, byte offset 22: cannot decode b'\\xe8' as utf-8.*"
                                         r"--encoding"):
        read_labeled(path)
    assert read_labeled(path, encoding="latin-1")[1].text == "crème brûlée"
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(json.dumps({"prompt": "é ->", "completion": " x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: line 1, byte offset 12.*--encoding"):
        check_prompt_completion(jsonl)


def test_json_array_elements_are_numbered_by_their_line_and_non_objects_reported(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "a ->", "completion": " b"},\n  [1, 2],\n  {"prompt": "c ->",\n'
                    '   "completion": " d"}\n]\n')
    table = read_records(path)
    assert [r.line for r in table.records] == [2, 4] and [b.line for b in table.bad] == [3]
    (tmp_path / "b.json").write_text('[{"prompt": "a"} {"prompt": "b"}]')
    with pytest.raises(ValueError, match=r"b.json: line 1: expected ','"):
        read_records(tmp_path / "b.json")


def test_real_sentiment_csv_reads_the_same_through_the_shared_reader():
    table = read_records(need_file(DATA / "sentiment" / "validation.csv"))
    assert table.header == ("text", "label") and len(table.records) == 960
    assert any("crème brûlée" in r.values["text"] for r in read_records(DATA / "sentiment" / "train.csv").records)


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@given(rows=st.lists(st.tuples(_text, _text.filter(lambda t: t.strip())), min_size=1, max_size=6))
def test_any_rows_read_back_the_same_from_every_format(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("formats")
    dicts = [{"prompt": p, "completion": c} for p, c in rows]
    for fmt, path in write_all_formats(folder, dicts).items():
        pairs = read_prompt_completion(path)
        assert [(p.prompt, p.completion) for p in pairs] == rows, fmt


def test_crlf_line_endings_read_like_lf(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,label\r\ngood,pos\r\n\"two\r\nlines\",neg\r\n")
    assert read_labeled(tmp_path / "a.csv") == [LabeledText("good", "pos", 2), LabeledText("two\r\nlines", "neg", 3)]
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "good", "label": "pos"}\r\n\r\n{"text": "bad", "label": "neg"}\r\n')
    assert [r.line for r in read_labeled(tmp_path / "a.jsonl")] == [1, 3]
