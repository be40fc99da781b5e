"""Bad inputs a new user tries, across the commands: each is a clear one-paragraph error
(exit 1, no traceback) or the correct result. The cases and their history are listed in
docs/reliability_cases.md."""
from __future__ import annotations

import pytest

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.tokenizer import CharTokenizer, save_tokenizer
from scripts.checkout import child_env

ALPHABET = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def char_model(tmp_path):
    """A tiny character-level model folder, as a pretraining checkpoint holds one."""
    folder = tmp_path / "model"
    tokenizer = CharTokenizer(ALPHABET)
    GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8,
                  attention_pattern=("dense",))).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def _error(args, capsys) -> str:
    """The one-line error `main(args)` exits with; asserts nothing went to stdout."""
    with pytest.raises(SystemExit) as err:
        main(args)
    assert capsys.readouterr().out == ""  # nothing half-done (e.g. the prompt) was printed
    message = str(err.value)
    assert message.startswith(f"minigpt {args[0]}: error: ") and "\n" not in message
    return message


def test_sample_empty_prompt_is_clear_error(char_model, capsys):
    message = _error(["sample", "--model", str(char_model), "--prompt", ""], capsys)
    assert "prompt='' is empty: there is nothing to continue" in message and "start from a newline" in message


def test_sample_empty_stop_string_is_clear_error(char_model, capsys):
    message = _error(["sample", "--model", str(char_model), "--prompt", "A", "--stop", ""], capsys)
    assert "a stop string must be non-empty text" in message


def test_sample_bad_settings_are_refused_before_the_prompt_is_printed(char_model, capsys):
    assert "top_p=2.0 must be a finite number in (0, 1]" in _error(
        ["sample", "--model", str(char_model), "--prompt", "A", "--top-p", "2"], capsys)
    assert "temperature=-1.0 must be >= 0" in _error(
        ["sample", "--model", str(char_model), "--prompt", "A", "--temperature", "-1"], capsys)


def test_sample_zero_and_beyond_block_size_new_tokens_work(char_model, capsys):
    main(["sample", "--model", str(char_model), "--prompt", "A", "--max-new-tokens", "0"])
    assert capsys.readouterr().out == "A\n"
    main(["sample", "--model", str(char_model), "--prompt", "A", "--max-new-tokens", "40", "--seed", "1"])
    assert len(capsys.readouterr().out) == 1 + 40 + 1  # the window slides past block_size=16


def test_train_out_dir_inside_the_data_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("some text to learn from\n" * 40)
    message = _error(["train", "--data", str(data), "--out-dir", str(data / "run"), "--max_steps=1"], capsys)
    assert f"train.out_dir {data / 'run'} is inside the data folder {data}" in message
    assert not (data / "run").exists()  # its run.lock was read as training text before
    message = _error(["prepare", str(data), "--out", str(data / "prepared")], capsys)
    assert "out_dir" in message and "is inside the data folder" in message


MC_ROWS = ('{"context": "The cat", "choices": [" sat", " ran"], "label": 0}\n'
           '{"context": "A dog", "choices": [" sat", " ran"], "label": 1}\n')


def test_eval_task_file_with_a_bom_is_read(char_model, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_bytes(b"\xef\xbb\xbf" + MC_ROWS.encode())
    main(["eval", "--model", str(char_model), str(task)])
    assert "acc" in capsys.readouterr().out


def test_eval_task_file_not_utf8_names_the_line_and_fix(char_model, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_bytes(MC_ROWS.encode() + '{"context": "The café", "choices": [" a", " b"], "label": 0}\n'.encode("latin-1"))
    message = _error(["eval", "--model", str(char_model), str(task)], capsys)
    assert f"{task}, line 3: byte b'\\xe9'" in message and "save the file as UTF-8" in message


def test_eval_empty_task_file_and_limit_zero_are_clear_errors(char_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no examples; each line must be one JSON object" in _error(
        ["eval", "--model", str(char_model), str(empty)], capsys)
    task = tmp_path / "task.jsonl"
    task.write_text(MC_ROWS)
    assert "limit=0 must be an integer >= 1" in _error(
        ["eval", "--model", str(char_model), str(task), "--limit", "0"], capsys)


def test_eval_contexts_cut_to_fit_the_block_are_reported(char_model, tmp_path, capsys, caplog):
    import logging

    task = tmp_path / "task.jsonl"
    task.write_text(MC_ROWS)
    with caplog.at_level(logging.WARNING):
        main(["eval", "--model", str(char_model), str(task), "--shots", "1", "--separator", "x" * 40])
    assert "2 of 2 contexts did not fit block_size=16" in caplog.text and "lower --shots" in caplog.text


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 80)
    return corpus


TINY_RUN = ["--n_layer=2", "--n_embd=16", "--n_head=2", "--block_size=16", "--batch_size=2", "--eval_steps=1",
            "--sample.tokens=0", "--progress=false", "--warmup_steps=0"]


def test_ctrl_c_mid_training_is_one_line_and_leaves_a_resumable_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from minigpt.cli import main; main(sys.argv[1:])")
    args = ["train", "--data", str(_corpus(tmp_path)), "--out-dir", str(run), "--max_steps=100000",
            "--checkpoint_interval=5", "--eval_interval=5", *TINY_RUN]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True,
                            env=child_env())
    deadline = time.time() + 60
    while not list((run / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "minigpt train: interrupted; the same command with --resume" in err
    assert not (run / "run.lock").exists()  # released: the next command may take the folder
    # The interrupt lands wherever training had got to: resume a few updates past the newest checkpoint.
    newest = max(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
    target = newest + 7
    main(args[:5] + [f"--max_steps={target}", "--resume", "--checkpoint_interval=5", "--eval_interval=5",
                     *TINY_RUN])
    assert (run / "checkpoints" / f"step_{target:07d}").is_dir()


def test_resume_past_max_steps_says_there_is_nothing_to_train(tmp_path, caplog):
    import logging

    args = ["train", "--data", str(_corpus(tmp_path)), "--out-dir", str(tmp_path / "run"), *TINY_RUN]
    main(args + ["--max_steps=4"])
    with caplog.at_level(logging.WARNING):
        main(args + ["--max_steps=2", "--resume"])
    assert "already at max_steps=2: there is nothing to train; raise --train.max_steps" in caplog.text


def test_a_thread_count_below_one_is_refused_with_the_default_named(capsys):
    with pytest.raises(SystemExit, match=r"--threads=-1 must be at least 1 \(leave it out for torch's default"):
        main(["sample", "--model", "nowhere", "--threads", "-1"])


@pytest.mark.parametrize("argv, says", [
    (["sample", "--model", "m", "--temprature", "0.5"], "--temprature: did you mean --temperature?"),
    (["serve", "--model", "m", "--max-bach", "4"], "--max-bach: did you mean --max-batch?"),
    (["finetune", "check", "a.csv", "--fixx"], "--fixx: did you mean --fix?"),
    # commands with overrides: the closest of their flags and override keys
    (["finetune", "classify", "--init", "m", "--train-file", "a.csv", "--out", "r", "--resum"],
     "--resum: did you mean --resume?"),
    (["train", "--data", "a.txt", "--resum"], "--resum: did you mean --resume?"),
    (["train", "--data", "a.txt", "--max_step=3"], "--max_step: did you mean --max_steps?"),
])
def test_a_misspelled_flag_gets_the_subcommands_usage_and_the_closest_flag(argv, says, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert says in err and f"usage: minigpt {' '.join(argv[:2 if argv[0] == 'finetune' else 1])}" in err


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_the_shared_writer_names_the_folder_and_leaves_the_old_one_whole(tmp_path, monkeypatch):
    from minigpt import files

    final = tmp_path / "checkpoints" / "step_0000002"
    files.write_atomically(final, lambda tmp: (tmp / "weights").write_text("old"))
    monkeypatch.setattr(files, "_fsync_file", _no_space)
    with pytest.raises(files.WriteError) as err:
        files.write_atomically(final, lambda tmp: (tmp / "weights").write_text("new"))
    assert str(err.value).startswith(f"cannot write {final}: the disk is full (No space left on device); free space")
    assert "--resume" in str(err.value)
    assert (final / "weights").read_text() == "old"  # the previous folder is untouched
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the half-written temporary is gone
    with pytest.raises(files.WriteError, match=f"cannot write {tmp_path / 'report.txt'}: the file system is read-only"):
        monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        files.write_text(tmp_path / "report.txt", "text")
    assert not list(tmp_path.glob(".report.txt*"))
    monkeypatch.undo()

    def rust_writer(tmp):  # safetensors reports the OS error inside its own exception's text
        raise RuntimeError('Error while serializing: IoError(Os { code: 122, kind: FilesystemQuotaExceeded })')

    with pytest.raises(files.WriteError, match="the disk quota is used up"):
        files.write_atomically(final, rust_writer)


def test_a_full_disk_while_training_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    from minigpt import files

    run = tmp_path / "run"
    args = ["train", "--data", str(_corpus(tmp_path)), "--out-dir", str(run), "--checkpoint_interval=2",
            "--eval_interval=2", *TINY_RUN]
    main(args + ["--max_steps=2"])
    monkeypatch.setattr(files, "_fsync_file", _no_space)
    message = _error(args + ["--max_steps=4", "--resume"], capsys)
    assert f"cannot write {run / 'checkpoints'}" in message and "the disk is full" in message
    assert "then run the same command again; a training run continues from its newest whole checkpoint with " \
           "--resume" in message
    monkeypatch.undo()
    main(args + ["--max_steps=4", "--resume"])  # step 2's checkpoint is whole, and the run goes on from it
    assert (run / "checkpoints" / "step_0000004").is_dir()
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_damaged_metadata_minigpt_wrote_names_the_file_the_line_or_key_and_the_fix(tmp_path, capsys):
    import json

    from minigpt.files import BadFileError
    from minigpt.finetune.data import LabelMap

    prepared = tmp_path / "prepared"
    main(["prepare", str(_corpus(tmp_path)), "--out", str(prepared), "--tokenizer=char"])
    meta = prepared / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_text(meta.read_text()[:40])  # cut off mid-write
    message = _error(["train", "--data", str(prepared), "--out-dir", str(tmp_path / "run"), "--max_steps=1"], capsys)
    assert f"prepared-data metadata {meta} is not valid JSON" in message and "line 3" in message
    assert "re-run `minigpt prepare`" in message
    meta.write_text(json.dumps({k: v for k, v in good.items() if k != "dtype"}))
    assert f"{meta} lacks the key 'dtype'" in _error(
        ["train", "--data", str(prepared), "--out-dir", str(tmp_path / "run"), "--max_steps=1"], capsys)
    del good["splits"]["train"]["shards"][0]["tokens"]
    meta.write_text(json.dumps(good))
    assert f"{meta}: the 'train' split lacks the key 'tokens'" in _error(
        ["train", "--data", str(prepared), "--out-dir", str(tmp_path / "run"), "--max_steps=1"], capsys)

    labels = tmp_path / "labels.json"
    LabelMap(("neg", "pos", "mixed")).save(labels)
    data = json.loads(labels.read_text())
    del data["id2label"]["1"]
    labels.write_text(json.dumps(data))
    with pytest.raises(BadFileError, match=r"label file .*labels.json lacks the key 'id2label.1'.*re-export the model"):
        LabelMap.load(labels)
    labels.write_text("{}")
    with pytest.raises(BadFileError, match=r"lacks the key 'id2label' \(it holds nothing\)"):
        LabelMap.load(labels)


def test_a_flag_written_with_underscores_is_the_commands_flag(monkeypatch):
    from minigpt import cli

    seen = {}
    monkeypatch.setattr(cli.finetune, "_finetune_train", lambda args: seen.update(vars(args)))
    parser = cli.build_parser()
    argv = cli._respelled(parser, ["finetune", "classify", "--init", "m", "--train_file", "a.csv", "--out", "r",
                                   "--lora_rank=4", "--max-steps=3", "--train.batch-size", "2"])
    args = parser.parse_args(argv)
    assert (args.lora_rank, args.train_file) == (4, "a.csv")
    assert args.overrides == ("train.max_steps=3", "train.batch_size=2")


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "{model}", "{task}", "--out", "{file}"],
    ["prepare", "{task}", "--out", "{file}"],
    ["finetune", "classify", "--init", "{model}", "--train-file", "{task}", "--out", "{file}"],
    ["train", "--data", "{task}", "--out-dir", "{file}"],
])
def test_an_output_folder_that_is_a_file_is_refused_before_anything_runs(argv, char_model, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(MC_ROWS)
    taken = tmp_path / "results"
    taken.write_text("keep me")
    with pytest.raises(SystemExit) as err:
        main([a.format(model=char_model, task=task, file=taken) for a in argv])
    assert err.value.code == 2
    out, message = capsys.readouterr()
    flag = "--train.out_dir/--out_dir" if argv[0] == "train" else "--out"  # --out-dir is --out_dir's dashed spelling
    assert out == "" and f"argument {flag}: {taken} is a file" in message
    assert taken.read_text() == "keep me"


def test_a_top_p_that_is_not_a_finite_number_in_range_is_refused_by_the_sampler_itself(char_model, capsys):
    import torch

    from minigpt.generate import sample_next

    for value in ("nan", "inf"):
        assert f"top_p={value} must be a finite number in (0, 1]" in _error(
            ["sample", "--model", str(char_model), "--prompt", "A", "--top-p", value], capsys)
        with pytest.raises(ValueError, match=f"top_p={value} must be a finite number"):
            sample_next(torch.zeros(1, 5), top_p=float(value))  # the server's engine calls this directly


@pytest.mark.parametrize("kind", ["multiple_choice", "free_form"])
def test_a_batch_size_of_zero_is_refused_by_every_evaluation_kind(kind, char_model, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(MC_ROWS if kind == "multiple_choice" else '{"prompt": "The cat", "completion": " sat"}\n')
    message = _error(["eval", "--model", str(char_model), str(task), "--batch-size", "0"], capsys)
    assert "batch_size=0 must be an integer >= 1" in message


def test_counts_of_the_classifier_commands_are_checked_before_any_work(char_model, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\ngood,pos\nbad,neg\n")
    assert "batch_size=0 must be an integer >= 1" in _error(["predict", str(char_model), "good", "--batch-size", "0"], capsys)
    assert "batch_size=0 must be an integer >= 1" in _error(
        ["evaluate", str(char_model), str(rows), "--batch-size", "0"], capsys)
    assert "limit=-1 must be an integer >= 1" in _error(
        ["fewshot", str(char_model), "--shots", str(rows), "--data", str(rows), "--limit", "-1"], capsys)


def test_a_file_too_small_to_hold_out_validation_is_refused_before_training(char_model, tmp_path, capsys):
    rows = tmp_path / "two.csv"
    rows.write_text("text,label\ngood,pos\nbad,neg\n")
    out = tmp_path / "run"
    message = _error(["finetune", "classify", "--init", str(char_model), "--train-file", str(rows), "--out", str(out),
                      "--max_steps=1"], capsys)
    assert f"{rows}: 2 rows are too few to hold out a validation split at val_fraction=0.1" in message
    assert "--val-file" in message and not out.exists()  # nothing was trained, nothing blocks the retry


def test_a_fresh_run_that_fails_before_its_first_checkpoint_does_not_block_the_retry(tmp_path, caplog):
    import logging

    from minigpt.train import runfolder

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="found late"):
        with runfolder.claim(out, resume=False):
            (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
            raise ValueError("bad data found late")
    (aside,) = out.glob("failed-*")
    assert (aside / "metrics.jsonl").is_file() and not (out / "metrics.jsonl").exists()  # kept, moved aside
    with caplog.at_level(logging.WARNING), runfolder.claim(out, resume=False):  # the corrected command starts
        (out / "checkpoints" / "step_0000001").mkdir(parents=True)
        (out / "metrics.jsonl").write_text("")
    assert "the run failed before its first checkpoint" in caplog.text
    with pytest.raises(ValueError, match="later"), runfolder.claim(out, resume=True):
        raise ValueError("later")
    assert (out / "metrics.jsonl").exists()  # a run with a checkpoint stays where --resume finds it


def test_a_character_outside_the_alphabet_in_a_finetuning_file_names_the_file_and_line(char_model, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f"ok {c},{'pos' if i % 2 else 'neg'}\n" for i, c in enumerate("abcdefgh"))
                    + "gr\u00e9at,pos\n")
    message = _error(["finetune", "classify", "--init", str(char_model), "--train-file", str(rows),
                      "--out", str(tmp_path / "run"), "--max_steps=1"], capsys)
    assert f"{rows}, line 10: character '\u00e9' is not in this tokenizer's alphabet" in message
    assert "replace it in that row" in message


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_before_anything_runs(tmp_path, capsys):
    folder = tmp_path / "model"
    GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8,
                  attention_pattern=("dense",))).save_pretrained(folder)
    save_tokenizer(CharTokenizer(ALPHABET), folder)
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "".join(f"ok {c},{'pos' if i % 2 else 'neg'}\n" for i, c in enumerate("abcdefgh")))
    out = tmp_path / "run"
    for argv in (["finetune", "classify", "--init", str(folder), "--train-file", str(rows), "--out", str(out),
                  "--max_steps=1"], ["sample", "--model", str(folder), "--prompt", "A"]):
        message = _error(argv, capsys)
        assert f"{folder}: its tokenizer gives {len(ALPHABET)} ids but the model has vocab_size=20" in message
    assert not out.exists()


def test_a_lora_rank_of_zero_on_the_command_line_is_refused_not_taken_as_train_everything(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "classify", "--init", "m", "--train-file", "a.csv", "--out", "r", "--lora-rank", "0"])
    assert "--lora-rank=0 must be at least 1" in capsys.readouterr().err


def test_finetuning_from_a_classifier_says_its_head_and_labels_are_dropped(tmp_path, caplog):
    import logging

    from minigpt.finetune.data import LabelMap
    from minigpt.finetune.export import HEAD_FILE, LABELS_FILE
    from minigpt.finetune.run import start_model

    folder = tmp_path / "classifier"
    GPT(GPTConfig(vocab_size=len(ALPHABET), block_size=16, n_layer=1, n_head=2, n_embd=8,
                  attention_pattern=("dense",))).save_pretrained(folder)
    save_tokenizer(CharTokenizer(ALPHABET), folder)
    (folder / HEAD_FILE).write_bytes(b"")
    LabelMap(("neg", "pos")).save(folder / LABELS_FILE)
    with caplog.at_level(logging.WARNING):
        start_model(folder)
    assert "is a fine-tuned classifier" in caplog.text and "['neg', 'pos'] are not carried over" in caplog.text


def test_an_eval_item_with_a_repeated_choice_is_reported_by_line(char_model, tmp_path, caplog):
    import logging

    task = tmp_path / "task.jsonl"
    task.write_text(MC_ROWS + '{"context": "A cat", "choices": [" sat", " sat"], "label": 1}\n')
    with caplog.at_level(logging.WARNING):
        main(["eval", "--model", str(char_model), str(task)])
    assert "1 of 3 items list the same choice twice (line 3 repeats ' sat')" in caplog.text


def test_finetune_check_refuses_a_block_size_below_one_and_a_folder_as_its_output(tmp_path, capsys):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "a:", "completion": " b"}\n')
    assert "block_size=0 must be an integer >= 1" in _error(["finetune", "check", str(rows), "--block-size", "0"],
                                                            capsys)  # every row was "too long" before
    with pytest.raises(SystemExit):
        main(["finetune", "check", str(rows), "--fix", "--out", str(tmp_path)])
    assert f"argument --out: {tmp_path} is a folder, and this is the file to write" in capsys.readouterr().err


def test_plot_creates_the_folder_of_its_png(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--data", str(_corpus(tmp_path)), "--out-dir", str(run), "--max_steps=2", "--eval_interval=2",
          *TINY_RUN])
    capsys.readouterr()
    main(["plot", str(run), "--out", str(tmp_path / "figures" / "loss.png")])
    assert (tmp_path / "figures" / "loss.png").is_file()  # was a bare [Errno 2]


def test_serve_refuses_a_port_out_of_range_or_in_use_before_loading_the_model(char_model, capsys):
    import socket

    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    assert "port=99999 must be an integer in 0..65535" in _error(
        ["serve", "--model", str(char_model), "--port", "99999"], capsys)  # uvicorn started on it before
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = _error(["serve", "--model", str(char_model), "--port", str(port)], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in message and "choose another --port" in message


def test_a_runs_checkpoints_folder_is_a_model_argument_like_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--data", str(_corpus(tmp_path)), "--out-dir", str(run), "--max_steps=2", "--eval_interval=2",
          *TINY_RUN])
    capsys.readouterr()
    main(["sample", "--model", str(run / "checkpoints"), "--prompt", "To", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("To")  # was "holds no model ... checkpoints/checkpoints/"
