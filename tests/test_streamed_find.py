"""directions --stream: the layer-streamed activations and selection are the in-memory ones.

Identities on tiny models of every family saved in many small shards: the float64 means per layer and
position, and the next-token logits, streamed one block at a time equal the in-memory ones (measured: equal
to the last bit on every family here; asserted within 1e-6 relative, since BLAS may block a matmul of a
different width differently); the selection's scores and its choice are the same; and through the CLI the saved
direction is the same, also when --max-memory splits a stage into several passes. Bad input fails before a
block is read, with one line.
"""

import json
import math
import re

import pytest
import torch
from conftest import ARCHS, SHARD, assert_clean_error, run_cli
from safetensors.torch import load_file, save_file

from abliterate.config import RunConfig
from abliterate.export.streamed import open_skeleton
from abliterate.find.activations import collect, collect_streamed
from abliterate.find.directions import Candidates
from abliterate.find.selection import select
from abliterate.model.arch import resolve
from abliterate.model.forward import last_logits
from abliterate.model.streamed import StreamedModel, parse_memory

STREAMABLE = [a for a in ARCHS if a != "qwen3_moe"]  # fused gate/up experts: a clear error (below)
ARGS = ["--n-train", "8", "--n-select", "4", "--batch-size", "3"]


def _texts(tokenizer, n=7):
    words = ["bread", "history of Rome", "a poem", "2 + 2", "the weather on Mars", "chess openings", "tea", "rust"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {w}" + " please" * (i % 3)}],
                                          tokenize=False, add_generation_prompt=True)
            for i, w in enumerate((words * 2)[:n])]


def _close(a, b, rel=1e-6):
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("arch", STREAMABLE)
def test_streamed_means_and_logits_are_the_in_memory_ones(arch, sharded, tokenizer):
    model, path = sharded(arch)
    texts = _texts(tokenizer)
    memory = collect(model, tokenizer, texts, n_positions=2, batch_size=3, desc=None)
    logits = last_logits(model, tokenizer, texts, 3)
    sm = StreamedModel(open_skeleton(path, RunConfig()), batch_size=3)
    (streamed,) = collect_streamed(sm, [texts], n_positions=2)
    assert streamed.mean.dtype == torch.float64 and streamed.mean.shape == memory.mean.shape
    assert _close(streamed.mean, memory.mean) and streamed.tokens == memory.tokens
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    (streamed_logits,) = sm.logits([(texts, None)])
    assert streamed_logits.shape == logits.shape and _close(streamed_logits, logits)
    assert all(p.is_meta for b in sm.blocks for p in b.parameters() if p.dim() > 1), "a block was left loaded"
    assert len(ids) == len(texts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_streamed_selection_is_the_in_memory_selection(arch, sharded, tokenizer):
    """The same scores for every candidate (bypass, KL, the lazy induce checks) and the same choice."""
    model, path = sharded(arch)
    harmful, harmless = _texts(tokenizer, 8)[:4], _texts(tokenizer, 8)[4:]
    a = collect(model, tokenizer, harmful, n_positions=1, batch_size=3, desc=None)
    b = collect(model, tokenizer, harmless, n_positions=1, batch_size=3, desc=None)
    cands = Candidates(a.mean, b.mean, (-1,))
    kw = {"projected": False, "min_layer_frac": 0.0, "max_layer_frac": 1.0, "kl_max": 10.0, "batch_size": 3}
    memory = select(model, tokenizer, resolve(model), cands, harmful, harmless, **kw)
    sm = StreamedModel(open_skeleton(path, RunConfig()), batch_size=3)
    streamed = select(sm.model, tokenizer, sm.layout, cands, harmful, harmless, runner=sm, **kw)
    assert len(streamed.scores) == len(memory.scores) == cands.n_layers
    for s, m in zip(streamed.scores, memory.scores):
        assert (s.layer, s.position, s.chosen) == (m.layer, m.position, m.chosen)
        assert math.isclose(s.bypass, m.bypass, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(s.kl, m.kl, rel_tol=1e-4, abs_tol=1e-6)
        assert (s.induce is None) == (m.induce is None)
        assert s.induce is None or math.isclose(s.induce, m.induce, rel_tol=1e-5, abs_tol=1e-5)
    assert streamed.direction.layer == memory.direction.layer
    assert torch.allclose(streamed.direction.vector, memory.direction.vector, atol=1e-6)


def _saved(path):
    from abliterate.find.directions import Direction

    return Direction.load(path)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer):
    """A Llama wide enough (hidden 256, 4 blocks of 2.6 MB, 11 MB in all) that a budget under its size holds one
    block and a few batches: the case --max-memory is for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("wide") / "llama"
    LlamaForCausalLM(config).eval().save_pretrained(path, max_shard_size="1MB")
    tokenizer.save_pretrained(path)
    return path


def test_directions_stream_saves_the_in_memory_direction(capsys, caplog, tmp_path, wide):
    """Through the CLI: --stream, and a --max-memory under the weights' size that splits each stage into several
    passes, save the in-memory direction (same layer, vector within float tolerance)."""
    weights = sum(p.stat().st_size for p in wide.glob("*.safetensors"))
    code, _, err = run_cli(capsys, "directions", wide, "-o", tmp_path / "memory.safetensors", *ARGS)
    assert code == 0, err
    code, _, err = run_cli(capsys, "directions", wide, "-o", tmp_path / "stream.safetensors", "--stream", *ARGS)
    assert code == 0, err
    code, _, err = run_cli(capsys, "directions", wide, "-o", tmp_path / "x.safetensors", *ARGS, "--max-memory", "1MB")
    assert_clean_error(code, err, "is too small for one block of this model", tmp_path / "x.safetensors")
    smallest = parse_memory(err.split("the smallest budget that works is ")[1].split(" ")[0])
    budget = int(smallest * 1.02)  # room for about one batch of hidden states besides the block
    assert budget < weights, (budget, weights)
    code, _, err = run_cli(capsys, "directions", wide, "-o", tmp_path / "budget.safetensors", *ARGS,
                           "--max-memory", f"{budget}B")
    assert code == 0, err
    assert "streamed, one block at a time" in caplog.text, caplog.text
    assert re.search(r"selection in \d+ passes", caplog.text), caplog.text
    memory = _saved(tmp_path / "memory.safetensors")
    for name in ("stream", "budget"):
        d = _saved(tmp_path / f"{name}.safetensors")
        assert d.layer == memory.layer and d.position == memory.position
        assert torch.allclose(d.vector, memory.vector, atol=1e-6), name
        assert math.isclose(d.scale, memory.scale, rel_tol=1e-6)


def test_max_memory_that_fits_loads_whole(capsys, caplog, tmp_path, sharded):
    _, src = sharded("llama")
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", *ARGS, "--max-memory", "8GB")
    assert code == 0, err
    assert "in memory: the model's" in caplog.text


@pytest.mark.parametrize("bad", ["lots", "12", "0GB", "5 parsecs", "1e3MB"])
def test_max_memory_is_parsed_strictly(bad, capsys, tmp_path, model_dirs):
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "directions", model_dirs["llama"], "-o", out, "--max-memory", bad)
    assert_clean_error(code, err, f"--max-memory {bad!r} is not a size", out)


def _copy(src, dst):
    """A copy of the sharded checkpoint to break (the fixture's own is shared)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_shard_named_in_the_index(capsys, tmp_path, sharded):
    broken = _copy(sharded("llama")[1], tmp_path / "broken")
    gone = sorted(broken.glob("model-*.safetensors"))[2]
    gone.unlink()
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "directions", broken, "-o", out, "--stream", *ARGS)
    assert_clean_error(code, err, f"names {gone.name}, which is not in", out)


def test_shard_that_disagrees_with_the_index(capsys, tmp_path, sharded):
    broken = _copy(sharded("llama")[1], tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name, shard = next((n, s) for n, s in index["weight_map"].items() if "layers.1.mlp.down_proj" in n)
    tensors = load_file(broken / shard)
    tensors[name + ".extra"] = tensors.pop(name)  # a tensor under a name the index does not give
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "directions", broken, "-o", out, "--stream", *ARGS)
    assert_clean_error(code, err, "does not match its shards", out)


def test_stream_refuses_what_it_cannot_read(capsys, tmp_path, sharded, model_dirs):
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "directions", model_dirs["qwen3_moe"], "-o", out, "--stream", *ARGS)
    assert_clean_error(code, err, "the streamed forward cannot read block 0", out)
    code, _, err = run_cli(capsys, "directions", "some/hub-id", "-o", out, "--stream", *ARGS)
    assert_clean_error(code, err, "--stream reads a local model directory", out)
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "o", "--stream", "--search")
    assert_clean_error(code, err, "run --search does not stream", tmp_path / "o")


def test_run_stream_finds_the_in_memory_direction(capsys, caplog, tmp_path, sharded):
    """run --stream: every step streamed (it says so); the direction and the edited model's metrics are the
    in-memory run's (tests/test_streamed_eval.py compares the whole run)."""
    from conftest import FAST

    _, src = sharded("llama")
    code, _, err = run_cli(capsys, "run", src, "-o", tmp_path / "memory", *FAST)
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", src, "-o", tmp_path / "stream", *FAST, "--stream")
    assert code == 0, err
    assert "evaluate edited: streamed, one block at a time, from the shards just written" in caplog.text
    a, b = (_saved(tmp_path / name / "direction.safetensors") for name in ("memory", "stream"))
    assert (a.layer, a.position) == (b.layer, b.position) and torch.allclose(a.vector, b.vector, atol=1e-6)
    ma, mb = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("memory", "stream"))
    assert mb["config"]["stream"] and not ma["config"]["stream"]
    assert [s["layer"] for s in ma["selection"]] == [s["layer"] for s in mb["selection"]]
    for x, y in zip(ma["selection"], mb["selection"]):
        assert math.isclose(x["bypass"], y["bypass"], rel_tol=1e-5, abs_tol=1e-5) and x["chosen"] == y["chosen"]
    assert ma["metrics"]["after"]["refusals"] == mb["metrics"]["after"]["refusals"]


def test_a_padding_index_beyond_the_rows_the_prompts_use(tmp_path, tokenizer):
    """The embedding's padding_idx (Qwen's is its last token) need not be one of the rows read for the prompts."""
    from conftest import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = make_config("qwen2", len(tokenizer))
    config.pad_token_id = len(tokenizer) - 1
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.get_input_embeddings().padding_idx == len(tokenizer) - 1
    model.save_pretrained(tmp_path / "m", max_shard_size=SHARD)
    tokenizer.save_pretrained(tmp_path / "m")
    texts = _texts(tokenizer, 4)
    memory = collect(model, tokenizer, texts, n_positions=1, batch_size=3, desc=None)
    sm = StreamedModel(open_skeleton(tmp_path / "m", RunConfig()), batch_size=3)
    (streamed,) = collect_streamed(sm, [texts], n_positions=1)
    assert _close(streamed.mean, memory.mean)
    assert sm.token_embedding.padding_idx == len(tokenizer) - 1  # given back


def test_a_stream_over_its_budget_gives_freed_memory_back(monkeypatch, sharded, tokenizer):
    """After each block the stream trims the heap when the resident set is over what it held at the start plus
    --max-memory, and only then (trimming costs page faults); without --max-memory it never trims. The
    figures are the same either way."""
    import platform

    from abliterate.model import streamed as module
    from abliterate.model.load import trim_heap

    texts = _texts(tokenizer, 4)
    trims, rss = [], [0]
    monkeypatch.setattr(module, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(module, "resident_bytes", lambda: rss[0])
    skel = open_skeleton(sharded("llama")[1], RunConfig(device="cpu"))
    sm = StreamedModel(skel, max_memory=1 << 30, batch_size=3)
    assert sm.rss_cap == 1 << 30
    (under,) = collect_streamed(sm, [texts], n_positions=1)
    assert trims == [] and sm.trims == 0
    rss[0] = (1 << 30) + 1  # over the cap from here on: one trim per block read
    (over,) = collect_streamed(sm, [texts], n_positions=1)
    assert len(trims) == sm.trims == len(sm.blocks)
    assert torch.equal(under.mean, over.mean)
    assert StreamedModel(skel, batch_size=3).rss_cap is None
    assert trim_heap() is (platform.libc_ver()[0] == "glibc")  # the real one == (platform.libc_ver()[0] == "glibc")
