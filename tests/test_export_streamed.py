"""apply --stream: the checkpoint baked shard by shard, each tensor in blocks, writes what the in-memory bake
writes, bit for bit.

Identities, not outputs: every tensor of the streamed output has the in-memory output's bytes, the
tensors the edit does not touch keep the input's bytes, the names are the same, and plain
transformers loads both to the same logits. Peak memory is a benchmark's question
(benchmarks/bench_stream_bake.py), not a test's.
"""

import json

import pytest
import torch
from conftest import assert_clean_error, inputs, make_model, random_ablation, run_cli
from safetensors.torch import load_file, save_file

from abliterate import resolve
from abliterate.edit import weighted
from abliterate.export.files import ABLATION, DIRECTION, manifest, to_json
from abliterate.find.directions import Direction

SHARD = "40KB"  # the tiny models (about 1 MB) in 10 to 30 shards


def _direction(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    Direction(torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0), layer=2).save(path)
    return path


def _sharded(tokenizer, arch, path, dtype=torch.float32):
    model = make_model(arch, tokenizer).to(dtype)
    model.save_pretrained(path, max_shard_size=SHARD)
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bytes(a) == _bytes(b)


def _both(capsys, src, out, *edit):
    """apply in memory and --stream with the same edit; both outputs' tensors, after checking what was printed."""
    code, text, err = run_cli(capsys, "apply", src, *edit, "-o", out / "memory")
    assert code == 0, err
    assert "baked in memory" in text
    code, text, err = run_cli(capsys, "apply", src, *edit, "-o", out / "streamed", "--stream")
    assert code == 0, err
    assert "baked shard by shard" in text
    return _weights(out / "memory"), _weights(out / "streamed")


def _assert_identical(memory, streamed, original, out):
    assert streamed.keys() == memory.keys()
    assert all(_same_bytes(memory[k], streamed[k]) for k in memory), \
        [k for k in memory if not _same_bytes(memory[k], streamed[k])]
    edited = {k for k in original if not _same_bytes(original[k], streamed[k])}
    assert edited and edited == {k for k in original if not _same_bytes(original[k], memory[k])}
    index = json.loads((out / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(memory)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((out / "memory" / name).read_text()) == json.loads((out / "streamed" / name).read_text())
    return edited


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "llama_tied"])
def test_streamed_bake_is_the_in_memory_bake(arch, capsys, tmp_path, tokenizer):
    """Llama; Qwen2 (biases, a tied head); Gemma 3 (post-norms, the image-text layout's own names); a tied Llama."""
    from transformers import AutoModelForCausalLM

    src = _sharded(tokenizer, arch, tmp_path / arch)
    original = _weights(src)
    memory, streamed = _both(capsys, src, tmp_path, "--direction", _direction(tmp_path / "d.safetensors"))
    edited = _assert_identical(memory, streamed, original, tmp_path)
    assert any("o_proj" in k for k in edited) and any("down_proj" in k for k in edited)
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert manifest["streamed"] and manifest["edited_tensors"] == \
        json.loads((tmp_path / "memory" / "manifest.json").read_text())["edited_tensors"]
    assert (tmp_path / "streamed" / DIRECTION).is_file()
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    if len(memory) > len(original):  # a tied head, untied because the embedding is edited, keeps the original
        head = (memory.keys() - original.keys()).pop()
        emb = next(k for k in original if k.endswith("embed_tokens.weight"))
        assert head.endswith("lm_head.weight") and _same_bytes(streamed[head], original[emb])
        assert config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings")) is False
    enc = inputs(tokenizer)
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(**enc).logits for d in ("memory", "streamed")]
    assert torch.equal(*logits)


def test_a_file_written_tensor_by_tensor_is_the_file_save_file_writes(tmp_path):
    """TensorFileWriter: every dtype a checkpoint holds, a 0-d tensor, tensors with no elements, rows in
    pieces: the bytes `save_file` writes for the same dict; out of order or too many bytes is a bug, caught."""
    from abliterate.export.files import TensorFileWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 3, generator=g), "h": torch.randn(5, 2, generator=g).to(torch.bfloat16),
               "f": torch.randn(3, generator=g).to(torch.float16), "ids": torch.arange(6).reshape(2, 3),
               "mask": torch.tensor([True, False, True]), "scale": torch.tensor(0.5, dtype=torch.float64),
               "none": torch.zeros(0, 4), "q": torch.randint(-8, 8, (4, 4), dtype=torch.int8, generator=g),
               "u": torch.arange(4, dtype=torch.uint8), "e": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn)}
    entries = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    with TensorFileWriter(tmp_path / "ours.safetensors", entries, {"format": "pt"}) as f:
        for name in f.order:
            t = tensors[name]
            for piece in (t.split(2) if t.dim() else [t]):
                f.write(name, piece)
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    with pytest.raises(AssertionError, match="written before"):
        with TensorFileWriter(tmp_path / "bad.safetensors", entries, {}) as f:
            f.write(f.order[-1], tensors[f.order[-1]])
    with pytest.raises(AssertionError, match="more bytes"):
        with TensorFileWriter(tmp_path / "bad.safetensors", {"w": (torch.float32, (2, 3))}, {}) as f:
            f.write("w", tensors["w"])


def test_the_bake_holds_a_block_not_a_shard(capsys, tmp_path, tokenizer, monkeypatch):
    """The whole model in one shard, blocks of 4 float32 rows of 64: the streamed bake reads the file in blocks
    of rows, opening it again after each block (a mapped file's pages count in the resident set), and writes
    every tensor in pieces of at most a block, but for the writers whose residual axis is their first (edited
    whole, as in memory: one tensor, never the shard). What it writes is the in-memory bake, bit for bit, the
    tied head untied with the original embedding, and the file `save_file` writes for the same tensors, byte
    for byte."""
    from abliterate.export import streamed

    block = 4 * 4 * 64
    monkeypatch.setattr(weighted, "BLOCK_BYTES", block)
    src = tmp_path / "one"
    make_model("llama_tied", tokenizer).save_pretrained(src)  # one model.safetensors, tied head
    tokenizer.save_pretrained(src)
    original = load_file(src / "model.safetensors")
    reads, opens, pieces = [], [], {}
    read, write, enter = streamed._Rows.__call__, streamed.TensorFileWriter.write, streamed.safe_open

    def reading(self, shard, name, start=None, stop=None):
        t = read(self, shard, name, start, stop)
        reads.append(self.since - t.nbytes)  # read since the file was last opened, before this
        return t

    def writing(self, name, piece):
        pieces.setdefault(name, []).append(piece.nbytes)
        return write(self, name, piece)

    monkeypatch.setattr(streamed._Rows, "__call__", reading)
    monkeypatch.setattr(streamed.TensorFileWriter, "write", writing)
    monkeypatch.setattr(streamed, "safe_open", lambda *a: opens.append(a) or enter(*a))
    memory, out = _both(capsys, src, tmp_path, "--direction", _direction(tmp_path / "d.safetensors"))
    assert memory.keys() == out.keys() == original.keys() | {"lm_head.weight"}
    assert all(_same_bytes(memory[k], out[k]) for k in memory)
    assert _same_bytes(out["lm_head.weight"], original["model.embed_tokens.weight"])
    assert not _same_bytes(out["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    # every read starts with less than a block mapped since the file was opened
    assert max(reads) < block and len(opens) > len(original) * 4 // 10
    whole = {k for k in original if "o_proj" in k or "down_proj" in k}  # (H, in): the edit mixes their rows
    assert whole and all(len(pieces[k]) == 1 for k in whole)
    emb = original["model.embed_tokens.weight"]
    big = {k for k in pieces if k not in whole and original.get(k, emb).nbytes > block}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= big  # the embedding is edited, the head copied
    assert all(len(pieces[k]) > 1 and max(pieces[k]) <= block for k in big)
    again = tmp_path / "again.safetensors"
    save_file(load_file(tmp_path / "streamed" / "model.safetensors"), again, metadata={"format": "pt"})
    assert again.read_bytes() == (tmp_path / "streamed" / "model.safetensors").read_bytes()


def test_a_bad_weight_found_mid_write_leaves_nothing(capsys, tmp_path, tokenizer, monkeypatch):
    """A nan in the last block of a tensor written late: the bake has written the shard's header and most of
    its data when it finds it. One line naming the tensor, exit 2, and neither the output nor its temporary
    directory left; the input untouched."""
    monkeypatch.setattr(weighted, "BLOCK_BYTES", 4 * 4 * 64)
    src = tmp_path / "one"
    make_model("llama", tokenizer).save_pretrained(src)
    tokenizer.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    last = sorted(n for n, t in tensors.items() if t.dim() == 2 and t.shape[0] > 8)[-1]
    tensors[last][-1, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    before = (src / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", src, "--direction", _direction(tmp_path / "d.safetensors"), "-o", out,
                           "--stream")
    assert_clean_error(code, err, f"nan or inf in {last}", out)
    assert not list(tmp_path.glob(".out*")) and (src / "model.safetensors").read_bytes() == before


def _searched(tmp_path, src, ablation) -> str:
    """The files `run --search` leaves for `apply --manifest`: manifest, direction and chosen ablation."""
    run = tmp_path / "searched"
    run.mkdir()
    _direction(run / DIRECTION)
    ablation.save(run / ABLATION)
    info = manifest("run", str(src), search={"chosen": {"number": 0, "params": ablation.params},
                                             "ablation_file": ABLATION})
    (run / "manifest.json").write_text(to_json(info))
    return str(run / "manifest.json")


@pytest.mark.parametrize("norm", ["none", "row", "column"])
def test_the_bake_in_blocks_of_rows_is_the_bake_in_one(norm, monkeypatch):
    """`WriterEdit.apply_` in blocks of 3 rows equals it in one block (float32 rounding apart), in place, for a
    matrix with its residual axis first or last, stacked experts and a bias."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=g)).Q.T.contiguous()  # (2, 16) orthonormal rows
    for shape, out_dim in (((16, 40), 0), ((40, 16), 1), ((3, 16, 10), 1), ((16,), 0)):
        w = torch.randn(*shape, generator=g)
        n_in = w.numel() // 16
        scales = {"none": None, "row": torch.rand(16, generator=g) + 0.5,
                  "column": torch.rand(n_in, generator=g) + 0.5}[norm]
        edit = weighted.WriterEdit(basis, 0.8, norm, scales)
        whole = edit(w, out_dim)
        monkeypatch.setattr(weighted, "BLOCK_BYTES", 3 * 4 * 16)
        blocked = w.clone()
        assert edit.apply_(blocked, out_dim) is blocked
        monkeypatch.setattr(weighted, "BLOCK_BYTES", 64 << 20)
        torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)
        residual = whole.movedim(out_dim, -1) @ basis.T
        if norm == "none":  # weight 0.8: a fifth of each row's component along the basis is left
            torch.testing.assert_close(residual, 0.2 * (w.movedim(out_dim, -1) @ basis.T), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,norm", [("qwen2", "row"), ("gpt2", "column"), ("llama", "none")])
def test_streamed_weighted_ablation_from_a_manifest(arch, norm, capsys, tmp_path, tokenizer, monkeypatch):
    """The search's edits: k = 2 bases, weights 0, below and above 1, the embeddings, norm preservation (GPT-2:
    Conv1D writers, biases and two embeddings). Blocks of 4 rows, so every matrix is edited in several."""
    monkeypatch.setattr(weighted, "BLOCK_BYTES", 4 * 4 * 64)
    src = _sharded(tokenizer, arch, tmp_path / arch)
    ablation = random_ablation(resolve(make_model(arch, tokenizer)), norm=norm)
    memory, streamed = _both(capsys, src, tmp_path, "--manifest", _searched(tmp_path, src, ablation))
    _assert_identical(memory, streamed, _weights(src), tmp_path)
    assert (tmp_path / "streamed" / ABLATION).is_file()


def test_streamed_fused_experts_in_pieces_across_shards(capsys, tmp_path, tokenizer, monkeypatch):
    """Qwen3-MoE: the model's (experts, H, I) down projection is one tensor per expert on disk; here every
    tensor has a shard of its own, so each fused parameter is read from several shards and written to them."""
    src = _sharded(tokenizer, "qwen3_moe", tmp_path / "moe")
    tensors = _weights(src)
    for f in src.glob("model*.safetensors"):
        f.unlink()
    names = sorted(tensors)
    files = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for n in names:
        save_file({n: tensors[n]}, str(src / files[n]), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    ablation = random_ablation(resolve(make_model("qwen3_moe", tokenizer)))
    memory, streamed = _both(capsys, src, tmp_path, "--manifest", _searched(tmp_path, src, ablation))
    edited = _assert_identical(memory, streamed, tensors, tmp_path)
    assert sum(".mlp.experts." in k and k.endswith("down_proj.weight") for k in edited) >= 8


def test_streamed_dtypes_are_the_in_memory_dtypes(capsys, tmp_path, tokenizer):
    """A bfloat16 checkpoint: loaded in float32 by default on a CPU (and written so, by both paths); with
    --dtype bfloat16 the tensors the edit does not touch are the input's bytes."""
    src = _sharded(tokenizer, "llama", tmp_path / "bf16", dtype=torch.bfloat16)
    original = _weights(src)
    d = _direction(tmp_path / "d.safetensors")
    memory, streamed = _both(capsys, src, tmp_path / "auto", "--direction", d)
    _assert_identical(memory, streamed, {k: v.float() for k, v in original.items()}, tmp_path / "auto")
    assert {t.dtype for t in streamed.values()} == {torch.float32}
    memory, streamed = _both(capsys, src, tmp_path / "bf16out", "--direction", d, "--dtype", "bfloat16")
    _assert_identical(memory, streamed, original, tmp_path / "bf16out")
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}


def test_stream_refuses_what_it_cannot_do(capsys, tmp_path, model_dirs):
    """One line, exit 2, nothing written, before any weight is read."""
    d = str(_direction(tmp_path / "d.safetensors"))
    src, out, gguf = model_dirs["llama"], tmp_path / "out", tmp_path / "out.gguf"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases = [
        (src, out, ["--adapter"], "--adapter"),
        (tmp_path / "model.gguf", out, [], "is a GGUF file"),
        (src, gguf, [], "writes a Hugging Face directory"),
        ("someone/some-model", out, [], "reads a local model directory"),
        (pickled, out, [], "reads only safetensors"),
        (src, src / "inside", [], "inside the input"),
    ]
    for model, output, extra, match in cases:
        code, _, err = run_cli(capsys, "apply", model, "--direction", d, "-o", output, *extra, "--stream")
        assert_clean_error(code, err, match, output)


def test_stream_refuses_a_checkpoint_that_does_not_fill_the_model(capsys, tmp_path, tokenizer):
    """A stale index, then a tensor gone from its shard and its index: the in-memory load refuses both too."""
    src = _sharded(tokenizer, "llama", tmp_path / "llama")
    d = str(_direction(tmp_path / "d.safetensors"))
    index = src / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    files = list(good["weight_map"].values())
    victim = min(k for k, f in good["weight_map"].items() if files.count(f) >= 2)
    fewer = dict(good, weight_map={k: f for k, f in good["weight_map"].items() if k != victim})
    index.write_text(json.dumps(fewer))
    code, _, err = run_cli(capsys, "apply", src, "--direction", d, "-o", tmp_path / "out", "--stream")
    assert_clean_error(code, err, "does not match its shards", tmp_path / "out")
    shard = src / good["weight_map"][victim]
    save_file({k: v for k, v in load_file(shard).items() if k != victim}, str(shard), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "apply", src, "--direction", d, "-o", tmp_path / "out", "--stream")
    assert_clean_error(code, err, "lacks 1 of the model's", tmp_path / "out")


def test_the_edit_does_not_depend_on_where_the_weights_start(monkeypatch):
    """A tensor read from a safetensors file starts 8-byte aligned, one torch allocates 64-byte aligned, and on an
    AVX-512 CPU a matrix product of rows 8 bytes past a 64-byte boundary sums in another order: the edit must
    write the same bits from both (the streamed bake reads blocks from the file, the in-memory one edits the
    loaded model)."""
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(512 * 64 + 16, generator=g)
    start = next(i for i in range(16) if (buf.data_ptr() + 4 * i) % 64 == 8)  # 8 bytes past a 64-byte boundary
    misaligned = buf[start:start + 512 * 64].view(512, 64)
    aligned = misaligned.clone()
    assert aligned.data_ptr() % 64 == 0 and misaligned.data_ptr() % 64 == 8
    basis = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    edit = weighted.WriterEdit(basis, 1.0)
    monkeypatch.setattr(weighted, "BLOCK_BYTES", 4 * 4 * 64)  # blocks of 4 rows, as in the tests above
    assert _same_bytes(edit.apply_(misaligned, 1), edit.apply_(aligned, 1))
