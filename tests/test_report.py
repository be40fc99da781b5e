import json
from collections import defaultdict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.presets import GPT3_TABLE, PRESETS
from minigpt.counts import activation_bytes_per_token, kv_cache_bytes, params, training_state_bytes
from minigpt.report import build_report, gpt3_table, load_config, report

configs = st.builds(
    lambda n_rep, pattern, n_head, head_dim, vocab, block, window, bias, qkv_bias, tie, inner: GPTConfig(
        vocab_size=vocab, block_size=block, n_layer=n_rep * len(pattern), n_head=n_head, n_embd=n_head * head_dim,
        attention_pattern=pattern, attention_window=window, bias=bias, qkv_bias=qkv_bias,
        tie_embeddings=tie, n_inner=inner,
    ),
    n_rep=st.integers(1, 2),
    pattern=st.sampled_from([("dense",), ("banded",), ("dense", "banded")]),
    n_head=st.integers(1, 3),
    head_dim=st.integers(1, 6),
    vocab=st.integers(2, 40),
    block=st.integers(1, 24),
    window=st.integers(1, 30),
    bias=st.booleans(),
    qkv_bias=st.booleans(),
    tie=st.booleans(),
    inner=st.one_of(st.none(), st.integers(1, 12)),
)


def counted_by_component(model: GPT) -> dict[str, int]:
    """Parameters of an instantiated model, summed per report component (q/k/v split off
    the fused attn.qkv by its row slices). A tied head is listed once, under tok_emb."""
    C = model.config.n_embd
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.startswith("blocks."):
            module = module.split(".", 2)[2]  # blocks.<i>.attn.qkv -> attn.qkv
        if module == "attn.qkv":
            for i, part in enumerate("qkv"):
                out[f"attn.{part}"] += p[i * C:(i + 1) * C].numel()
        else:
            out[module] += p.numel()
    return out


@given(config=configs)
def test_report_counts_equal_instantiated_model_component_by_component(config):
    model = GPT(config)
    data = build_report(config)
    counted = counted_by_component(model)
    reported = {row["name"]: row["total"] for row in data["params"]["components"]}
    assert set(counted) <= set(reported)
    assert reported == {name: counted.get(name, 0) for name in reported}
    assert data["params"]["total"] == model.num_params()


def test_tied_head_is_reported_as_sharing_the_embedding():
    rows = {r["name"]: r for r in build_report(GPTConfig.from_preset("gpt2"))["params"]["components"]}
    assert rows["lm_head"]["total"] == 0 and rows["lm_head"]["shape"] == "tied to tok_emb"
    untied = GPTConfig.from_preset("gpt2", tie_embeddings=False)
    rows = {r["name"]: r for r in build_report(untied)["params"]["components"]}
    assert rows["lm_head"]["total"] == 50257 * 768


@pytest.mark.parametrize("name", sorted(GPT3_TABLE))
def test_gpt3_report_shows_table_2_1_and_flags_only_the_printed_inconsistencies(name):
    paper = build_report(GPTConfig.from_preset(name), name)["paper"]
    assert {key: row["paper"] for key, row in paper.items()} == GPT3_TABLE[name]
    differs = {key for key, row in paper.items()
               if key != "n_params" and row["config"] is not None and row["config"] != row["paper"]}
    assert differs == {"gpt3-xl": {"n_heads"}, "gpt3-13b": {"d_model"}}.get(name, set())
    for key in differs:  # the note explains it from the row itself
        assert "inconsistent" in paper[key]["note"]
    assert paper["n_params"]["config"] == params(GPTConfig.from_preset(name))
    assert paper["batch_tokens"]["config"] is None and paper["lr"]["config"] is None


def test_gpt3_family_table_lists_all_eight_sizes():
    table = gpt3_table()
    assert [row["name"] for row in table] == list(GPT3_TABLE)
    text = report("gpt3")
    for name, row in GPT3_TABLE.items():
        assert name in text
    assert "24 (ours 16)*" in text and "5140 (ours 5120)*" in text


@given(config=configs, batch=st.integers(1, 3), dtype=st.sampled_from(["fp32", "bf16"]))
def test_kv_cache_bytes_equal_the_tensors_new_cache_allocates(config, batch, dtype):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cache = GPT(config).to(torch_dtype).new_cache(batch)
    allocated = sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)
    assert kv_cache_bytes(config, config.block_size, batch, dtype) == allocated


@pytest.mark.parametrize("T", [1, 4, 7, 16])
def test_kv_cache_bytes_count_the_slots_a_prompt_fills(T):
    # Independent of the formula: run T tokens through the cache and count written slots.
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=4, n_head=2, n_embd=8,
                       attention_pattern=("dense", "banded"), attention_window=5)
    torch.manual_seed(0)
    model = GPT(config).eval()
    cache = model.new_cache(1)
    for layer in cache.layers:  # the buffers are uninitialised: poison them to see writes
        layer.k.fill_(float("nan"))
    model(torch.randint(0, 11, (1, T)), cache=cache)
    filled = sum(int((~layer.k[0, 0].isnan()).all(-1).sum()) for layer in cache.layers)
    assert kv_cache_bytes(config, T, 1, "fp32") == 2 * config.n_embd * filled * 4


def test_training_state_bytes_equal_a_real_adamw_step():
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 13, (2, 8))
    model(idx, idx).loss.backward()
    optimizer.step()
    params_ = list(model.parameters())
    states = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    expected = {
        "weights": sum(p.nbytes for p in params_),
        "gradients": sum(p.grad.nbytes for p in params_),
        "adamw": sum(t.nbytes for t in states),
    }
    assert training_state_bytes(config, "fp32") == expected
    assert training_state_bytes(config, "bf16") == {k: v // 2 for k, v in expected.items()}


def test_activation_bytes_follow_korthikanti_per_layer_formula():
    # sbh(34 + 5as/h) bytes per layer (Korthikanti et al. 2022, eq. 1), written out for s, b.
    s, b = 2048, 3
    dense = GPTConfig.from_preset("gpt3-175b", attention_pattern=("dense",))
    h, a, L = dense.n_embd, dense.n_head, dense.n_layer
    assert activation_bytes_per_token(dense, s) * s * b == L * s * b * h * (34 + 5 * a * s / h)
    # Banded layers keep (H, T, w) scores instead of (H, T, T).
    gpt3 = GPTConfig.from_preset("gpt3-175b")
    assert activation_bytes_per_token(gpt3, s) == L * 34 * h + L // 2 * 5 * a * (s + 256)
    assert activation_bytes_per_token(gpt3, s, stored_scores=False) == L * 34 * h


def test_flops_in_report_add_up():
    f = build_report(GPTConfig.from_preset("gpt3-small"), seq_len=1000)["flops_per_token"]
    assert f["forward_matmul"] + f["forward_attention"] == pytest.approx(f["forward"])
    assert f["training"] == pytest.approx(3 * f["forward"])


def test_load_config_reads_presets_json_and_model_folders(tmp_path):
    config = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=8)
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert load_config(str(tmp_path / "c.json")) == (str(tmp_path / "c.json"), config)
    GPT(config).save_pretrained(tmp_path / "model")
    assert load_config(str(tmp_path / "model"))[1] == config
    assert load_config(str(tmp_path / "model" / "config.json"))[1] == config
    assert load_config("gpt2")[1] == GPTConfig.from_preset("gpt2")
    with pytest.raises(ValueError, match="neither a preset.*gpt2"):
        load_config(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("n_layer: 2")
    with pytest.raises(ValueError, match="notes.txt is not valid JSON: .* line 1, column 1"):
        load_config(str(tmp_path / "notes.txt"))


def test_cli_inspect_prints_tables_and_json_for_175b_without_allocating(capsys):
    main(["inspect", "gpt3-175b", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] == params(GPTConfig.from_preset("gpt3-175b"))
    assert data["params"]["published"] == 175e9
    main(["inspect", "gpt3-175b", "--seq-len", "1024", "--batch-size", "4"])
    text = capsys.readouterr().out
    for words in ("174,604,259,328", "175,000,000,000", "FLOPs per token, T=1024", "AdamW", "KV cache, batch 4 x 1024",
                  "Korthikanti"):
        assert words in text
    # The parameter table is aligned: every row's right-aligned 'total' ends in the same column.
    lines = text.splitlines()
    ends = set()
    for row in data["params"]["components"]:
        line = next(line for line in lines if line.startswith(f"  {row['name']} "))
        ends.add(line.rindex(f" {row['total']:,}") + len(f" {row['total']:,}"))
    assert len(ends) == 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_reports(name):
    assert name in report(name)


@pytest.mark.parametrize("backend, banded_context", [(None, 4.0), ("triton", 4.0), ("sdpa", 6.0), ("math", 6.0)])
def test_banded_attention_work_follows_the_backend(backend, banded_context):
    # T=10, w=4: sdpa and math score ceil(10/2)=5 blocks of b=w/2=2 queries against w+b=6 keys
    # each (60 pairs, 6.0 keys per query); the kernel and the MFU convention count the band.
    from minigpt.counts import computed_attention_context

    config = GPTConfig(vocab_size=11, block_size=10, n_layer=2, n_head=2, n_embd=8,
                       attention_pattern=("dense", "banded"), attention_window=4)
    assert computed_attention_context(config, 10, 0, backend) == 10.0
    assert computed_attention_context(config, 10, 1, backend) == banded_context
    data = build_report(config, seq_len=10, backend=backend or "sdpa")
    assert data["flops_per_token"]["forward_attention_computed"] == 4.0 * 8 * (10.0 + (banded_context if backend else 6.0))
    stores = backend == "math"
    act = data["activations"]
    assert (act["per_token_backend"] > act["per_token_fused_attention"]) == stores


def test_inspect_shows_the_backend_and_rejects_an_unknown_one(capsys):
    main(["inspect", "gpt3-small", "--seq-len", "2048"])
    assert "as backend=sdpa computes it" in capsys.readouterr().out
    main(["inspect", "gpt3-small", "--backend", "triton"])
    out = capsys.readouterr().out
    assert "as backend=triton computes it" in out and "backend=triton (fused)" in out
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        build_report(GPTConfig.from_preset("gpt3-small"), backend="cuda")
