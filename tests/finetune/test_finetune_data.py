import json

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.finetune.classify import LabeledText, read_labeled
from minigpt.finetune.completion import PromptCompletion, encode_completion, pack_completions
from minigpt.finetune.data import (
    IGNORE_INDEX, CompletionExample, LabelMap, ShuffledBatches, collate_classification, collate_completion,
)
from minigpt.finetune.split import split_without_leakage, stratified_split
from tests.helpers import DATA, need_file, use_tiktoken_cache


class SpaceTokenizer:
    """Words to ids (1 + position in a fixed list); eos is 0. Enough to see every token."""

    eos_id = 0

    def __init__(self, words):
        self.words = list(words)

    def encode(self, text):
        return [1 + self.words.index(w) for w in text.split()]


def test_read_labeled_csv_tsv_jsonl_with_named_columns(tmp_path):
    (tmp_path / "a.csv").write_text('sentence,y,other\n"good, really",pos,1\nbad,neg,2\n')
    (tmp_path / "a.tsv").write_text("sentence\ty\ngood\tpos\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"sentence": "bad", "y": "neg"}) + "\n\n")
    rows = read_labeled(tmp_path / "a.csv", text_column="sentence", label_column="y")
    assert rows == [LabeledText("good, really", "pos", 2), LabeledText("bad", "neg", 3)]
    assert read_labeled(tmp_path / "a.tsv", "sentence", "y") == [LabeledText("good", "pos", 2)]
    assert read_labeled(tmp_path / "a.jsonl", "sentence", "y") == [LabeledText("bad", "neg", 1)]


def test_read_labeled_errors_name_the_column_or_line(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,y\ngood,pos\n")
    with pytest.raises(ValueError, match=r"no column 'text' or 'label'; the file has \['sentence', 'y'\]"):
        read_labeled(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("text,label\ngood,pos\nfine,\n")
    with pytest.raises(ValueError, match=r"b.csv:3: empty 'label'"):
        read_labeled(tmp_path / "b.csv")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_labeled(tmp_path / "c.txt")


def test_label_map_is_sorted_saved_and_strict(tmp_path):
    rows = [LabeledText("t", label, 1) for label in ("world", "sports", "world", "business")]
    labels = LabelMap.from_examples(rows)
    assert labels.labels == ("business", "sports", "world") and labels.id("world") == 2
    labels.save(tmp_path / "labels.json")
    assert json.loads((tmp_path / "labels.json").read_text())["id2label"] == {"0": "business", "1": "sports", "2": "world"}
    assert LabelMap.load(tmp_path / "labels.json") == labels
    with pytest.raises(ValueError, match="'tech' is not one of the model's labels"):
        labels.id("tech")


def test_stratified_split_keeps_label_shares_and_is_reproducible():
    rows = [LabeledText(f"t{i}", "a" if i % 4 == 0 else "b", i) for i in range(40)]  # 10 a, 30 b
    train, val = stratified_split(rows, 0.2, seed=3)
    assert sorted(e.label for e in val) == ["a"] * 2 + ["b"] * 6
    assert sorted(train + val, key=lambda e: e.line) == rows and not set(train) & set(val)
    assert stratified_split(rows, 0.2, seed=3) == (train, val)
    assert stratified_split(rows, 0.2, seed=4)[1] != val


def test_real_sentiment_file_reads_and_splits():
    rows = read_labeled(need_file(DATA / "sentiment" / "validation.csv"))
    assert len(rows) == 960 and LabelMap.from_examples(rows).labels == ("negative", "positive")
    _, val = stratified_split(rows, 0.1)
    assert sum(e.label == "positive" for e in val) == round(496 * 0.1)


def test_completion_targets_are_the_completion_and_eos_only():
    tok = SpaceTokenizer("a b c d e f".split())
    example = encode_completion(tok, PromptCompletion("a b c", "d e", 1))
    assert example.tokens == (1, 2, 3, 4, 5, 0)
    assert example.mask == (False, False, False, True, True, True)
    batch = collate_completion([example, encode_completion(tok, PromptCompletion("f", "a", 2))])
    assert batch["idx"].tolist() == [[1, 2, 3, 4, 5], [6, 1, 0, 0, 0]]
    assert batch["targets"].tolist() == [[-100, -100, 4, 5, 0], [1, 0, -100, -100, -100]]


def test_prompt_positions_get_no_gradient():
    """The loss the model computes from a collated batch has zero gradient at every
    position whose target is a prompt token or padding."""
    tok = SpaceTokenizer("a b c d e f".split())
    pairs = [PromptCompletion("a b c d", "e f", 1), PromptCompletion("b", "c d e", 2)]
    batch = collate_completion([encode_completion(tok, p) for p in pairs])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=8))
    logits = model(batch["idx"]).logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert has_grad.tolist() == [[False, False, False, True, True, True],
                                 [True, True, True, True, False, False]]
    torch.testing.assert_close(model(batch["idx"], batch["targets"]).loss, loss)


def test_packing_fills_rows_and_keeps_every_mask():
    examples = [CompletionExample(tuple(range(i, i + n)), (False,) * (n - 2) + (True,) * 2)
                for i, n in enumerate([3, 4, 5, 3, 6, 3])]
    rows = pack_completions(examples, block_size=8, seed=0)
    assert all(len(r.tokens) <= 9 for r in rows) and len(rows) < len(examples)
    assert sum(len(r.tokens) for r in rows) == sum(len(e.tokens) for e in examples)
    assert sum(sum(r.mask) for r in rows) == 2 * len(examples)
    batch = collate_completion(rows)
    # Every example starts with a prompt token, so every masked token is a target.
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == 2 * len(examples)


def test_shuffled_batches_cover_each_epoch_and_resume_exactly():
    examples = list(range(10))
    batches = ShuffledBatches(examples, batch_size=4, collate=lambda xs: {"x": torch.tensor(xs)}, seed=1)
    first = [batches.next_batch()["x"] for _ in range(5)]  # 20 = two epochs
    epoch0 = torch.cat(first)[:10]
    assert sorted(epoch0.tolist()) == examples
    state = batches.state_dict()
    expected = [batches.next_batch()["x"] for _ in range(3)]
    resumed = ShuffledBatches(examples, batch_size=4, collate=lambda xs: {"x": torch.tensor(xs)}, seed=1)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()["x"], want)
    with pytest.raises(ValueError, match="same data, seed, data-parallel ranks and batch size"):
        ShuffledBatches(examples[:5], 4, lambda xs: xs, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="of batch 4; this run has 10, 1, 1, 2"):  # batch_size may change on resume
        ShuffledBatches(examples, 2, lambda xs: xs, seed=1).load_state_dict(state)


def test_classification_batch_is_right_padded_with_lengths():
    from minigpt.finetune.data import ClassificationExample

    batch = collate_classification([ClassificationExample((5, 6, 7), 1), ClassificationExample((8,), 0)], pad_id=9)
    assert batch["idx"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["lengths"].tolist() == [3, 1] and batch["labels"].tolist() == [1, 0]


def test_ranks_read_disjoint_slices_of_each_epoch():
    collate = lambda xs: {"x": torch.tensor(xs)}  # noqa: E731
    ranks = [ShuffledBatches(list(range(12)), 3, collate, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([b.next_batch()["x"] for _ in range(2)]).tolist() for b in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))


def test_labels_that_differ_only_by_case_or_spaces_are_an_error_naming_spellings_and_counts(tmp_path, caplog):
    path = tmp_path / "a.csv"
    path.write_text("text,label\ngreat,positive\nfine,Positive\nnice,positive\ndull,negative\nmeh,negative \n")
    with pytest.raises(ValueError, match=r"'Positive' \(1 rows\) vs 'positive' \(2 rows\); 'negative' \(1 rows\) "
                                         r"vs 'negative ' \(1 rows\).*--merge-label-case"):
        read_labeled(path)
    with caplog.at_level("WARNING"):
        rows = read_labeled(path, merge_label_case=True)
    assert [r.label for r in rows] == ["positive", "positive", "positive", "negative", "negative"]
    assert "merged the labels 'Positive' (1 rows), 'positive' (2 rows) into 'positive'" in caplog.text
    # Merging against known labels (a model's, the training file's) takes their spelling.
    assert {r.label for r in read_labeled(path, merge_label_case=True, known_labels=("POSITIVE", "negative"))} == {
        "POSITIVE", "negative"}


def test_duplicates_are_kept_on_one_side_of_the_held_out_split(caplog):
    rows = [LabeledText(f"text {i % 12}", "ab"[i % 2], i + 1) for i in range(60)]  # each text 5 times
    leaky_train, leaky_val = stratified_split(rows, 0.2, seed=0)
    assert {r.text for r in leaky_train} & {r.text for r in leaky_val}  # what happened before
    with caplog.at_level("WARNING"):
        train, val = split_without_leakage(rows, 0.2, seed=0, source="a.csv")
    assert not {r.text for r in train} & {r.text for r in val}
    assert sorted(train + val, key=lambda r: r.line) == rows and 0 < len(val) < 30
    assert "a.csv: 48 rows repeat another row's text (12 groups, e.g. lines 1, 13, 25, 37, 49)" in caplog.text


def test_validation_rows_that_also_occur_in_training_are_reported_with_counts(tmp_path, monkeypatch, caplog):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer
    from minigpt.finetune.config import FinetuneConfig, default_train_config
    from minigpt.finetune.run import prepare

    (tmp_path / "train.csv").write_text("text,label\ngood film,pos\nbad film,neg\nfine,pos\nawful,neg\n")
    (tmp_path / "val.csv").write_text("text,label\nbad film,neg\nnew one,pos\n")
    config = FinetuneConfig(task="classify", train_file=str(tmp_path / "train.csv"),
                            val_file=str(tmp_path / "val.csv"))
    model = GPT(GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with caplog.at_level("WARNING"):
        run, _ = prepare(config, default_train_config(config, str(tmp_path / "run"), {"device": "cpu"}),
                         model=model, tokenizer=Tokenizer())
    assert run.details["val_rows_in_train"] == 1
    assert "1 of 2 validation rows have a text that also occurs in the training file" in caplog.text
    assert "val.csv:2 = " in caplog.text and "train.csv:3" in caplog.text


def test_completion_run_reads_a_tsv_with_named_columns_and_keeps_repeated_prompts_on_one_side(
        tmp_path, monkeypatch, caplog):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer
    from minigpt.finetune.config import FinetuneConfig, default_train_config
    from minigpt.finetune.run import prepare

    lines = ["q\ta"] + [f"Question {i % 5} ->\t answer {i % 5}" for i in range(20)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    config = FinetuneConfig(task="completion", train_file=str(tmp_path / "pairs.tsv"), prompt_column="q",
                            completion_column="a", val_fraction=0.2)
    model = GPT(GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with caplog.at_level("WARNING"):
        run, _ = prepare(config, default_train_config(config, str(tmp_path / "run"), {"device": "cpu"}),
                         model=model, tokenizer=Tokenizer())
    assert run.details["train_pairs"] + run.details["val_pairs"] == 20
    # One whole group of 4 repeats is held out: training sees the other 4 prompts only.
    assert run.details["val_pairs"] == 4 and len({e.tokens for e in run.train_batches.examples}) == 4
    assert "15 rows repeat another row's prompt (5 groups" in caplog.text
