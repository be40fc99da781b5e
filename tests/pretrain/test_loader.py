"""The loader: memory-mapped random windows, deterministic, resumable, sliced per rank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minigpt.pretrain import FixedWindows, PrepareConfig, RandomWindows, TokenSplit, prepare


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A char dataset in shards of 50 tokens, so windows come from several files."""
    tmp = tmp_path_factory.mktemp("loader")
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))
    (tmp / "t.txt").write_text(text)
    prepare(PrepareConfig(inputs=(str(tmp / "t.txt"),), out_dir=str(tmp / "out"), tokenizer="char",
                          shard_tokens=50, progress=False))
    return TokenSplit(tmp / "out", "train")


def test_batches_are_shifted_windows_of_one_shard(sharded):
    loader = RandomWindows(sharded, block_size=8, batch_size=16, seed=0)
    shards = [np.asarray(a).tolist() for a in sharded.arrays]
    for _ in range(5):
        batch = loader.next_batch()
        assert batch["idx"].shape == batch["targets"].shape == (16, 8) and batch["idx"].dtype == torch.int64
        assert torch.equal(batch["idx"][:, 1:], batch["targets"][:, :-1])
        for row, last in zip(batch["idx"].tolist(), batch["targets"][:, -1].tolist()):
            window = row + [last]
            assert any(window == s[i:i + 9] for s in shards for i in range(len(s) - 8))


def test_same_seed_same_batches_and_state_resumes_exactly(sharded):
    a, b = RandomWindows(sharded, 8, 4, seed=3), RandomWindows(sharded, 8, 4, seed=3)
    assert all(torch.equal(a.next_batch()["idx"], b.next_batch()["idx"]) for _ in range(3))
    assert not torch.equal(RandomWindows(sharded, 8, 4, seed=4).next_batch()["idx"], a.next_batch()["idx"])
    state = a.state_dict()
    expected = [a.next_batch()["idx"] for _ in range(3)]
    resumed = RandomWindows(sharded, 8, 4, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.next_batch()["idx"]) for e in expected)
    with pytest.raises(ValueError, match="global_batch"):
        RandomWindows(sharded, 8, 2, seed=3).load_state_dict(state)


def test_each_rank_reads_its_slice_of_the_global_batch(sharded):
    whole = RandomWindows(sharded, 8, 6, seed=1)
    ranks = [RandomWindows(sharded, 8, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = whole.next_batch()["idx"]
        assert torch.equal(torch.cat([r.next_batch()["idx"] for r in ranks]), full)


def test_fixed_windows_repeat_every_evaluation(sharded):
    evals = FixedWindows(sharded, 8, 4, steps=3, seed=0)
    first, second = list(evals()), list(evals())
    assert len(first) == 3 and all(torch.equal(x["idx"], y["idx"]) for x, y in zip(first, second))


def test_split_shorter_than_a_window_is_an_error(sharded):
    with pytest.raises(ValueError, match="too few for one window"):
        RandomWindows(sharded, block_size=60, batch_size=1, seed=0)


def test_an_out_of_range_token_id_names_the_shard_the_id_and_the_vocab_size(tmp_path):
    (tmp_path / "t.txt").write_text("abcd" * 100)
    prepare(PrepareConfig(inputs=(str(tmp_path / "t.txt"),), out_dir=str(tmp_path / "out"), tokenizer="char",
                          shard_tokens=50, progress=False))
    shard = tmp_path / "out" / "train_000002.bin"
    ids = np.fromfile(shard, dtype="<u2")
    ids[7] = 999  # corrupt one id, keeping the size (and so passing the size check)
    ids.tofile(shard)
    with pytest.raises(ValueError, match=r"train_000002.bin does not match the sha256"):
        TokenSplit(tmp_path / "out", "train", verify=True)  # found by the full check ...
    split = TokenSplit(tmp_path / "out", "train")
    loader = RandomWindows(split, block_size=8, batch_size=64, seed=0)
    with pytest.raises(ValueError, match=r"train_000002.bin: token id 999 at token 7 is out of range for the "
                                         r"vocabulary of 4 ids in meta.json.*re-run `minigpt prepare`"):
        for _ in range(50):  # ... and, without it, by the loader when a window covers it
            loader.next_batch()


def test_rows_are_the_windows_their_indices_name_across_shards(sharded):
    """`TokenSplit.rows` (a shard at a time) against a window-by-window reading."""
    cumulative = sharded.windows(8).tolist()
    firsts = [0, *cumulative[:-1]]
    want = {}
    for index in range(cumulative[-1]):
        shard = next(k for k, end in enumerate(cumulative) if index < end)
        offset = index - firsts[shard]
        want[index] = np.asarray(sharded.arrays[shard][offset:offset + 9]).tolist()
    order = list(range(cumulative[-1]))[::-3] + [0, 0]  # out of order, every shard, repeats
    assert sharded.rows(np.asarray(cumulative), order, 8).tolist() == [want[i] for i in order]
