"""--device-map: a model spread by accelerate over the devices, with what fits nowhere offloaded to disk.

This machine has no GPU, so the map here is the CPU and the disk: accelerate's hooks bring each offloaded block's
weights in from the offload folder for its forward pass, and its parameters stay on the meta device between
passes, as a CPU-offloaded block's do beside a small GPU. A run on such a model (tiny random models saved in many
small shards, a CPU budget of half their weights) gives the in-memory run's chosen layer and figures, its baked
tensors bit for bit (the bake reads the source's shards), and the report says how each stage ran.
"""

import json
import math

import pytest
import torch
from conftest import FAST, assert_clean_error, run_cli
from safetensors.torch import load_file

from abliterate.edit.project import ablated
from abliterate.find.directions import Direction
from abliterate.model.load import load_model
from abliterate.model.mapped import offloaded, parse_device_memory, where


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "direction.safetensors":
            out.update(load_file(f))
    return out


def _half(model) -> str:
    """A CPU budget of half `model`'s weights: accelerate offloads the rest to disk."""
    return f"cpu={sum(p.numel() * p.element_size() for p in model.parameters()) // 2}B"


def test_parse_device_memory():
    assert parse_device_memory("0=2GB, cuda:1=512MB,cpu=1KiB") == {0: 2 * 10**9, 1: 512 * 10**6, "cpu": 1024}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_hooks_on_an_offloaded_model_are_the_hooks_in_memory(arch, sharded, tokenizer):
    """Part of the model on disk (its parameters on the meta device): the same logits, with and without the edit."""
    model, src = sharded(arch)
    mapped = load_model(src, device_map="auto", device_memory=_half(model), dtype="float32")
    assert "disk" in where(mapped.model) and offloaded(mapped.model), mapped.model.hf_device_map
    ids = tokenizer(["Tell me about bread", "How do I pick a lock?"], return_tensors="pt", padding=True)
    direction = Direction(torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0), layer=1,
                          position=-1)
    with torch.inference_mode():
        for hooks in (lambda m: ablated(m, direction), None):
            if hooks is None:
                a, b = model(**ids).logits, mapped.model(**ids).logits
            else:
                with hooks(model):
                    a = model(**ids).logits
                with hooks(mapped.model):
                    b = mapped.model(**ids).logits
            assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_run_device_map_is_the_in_memory_run(arch, capsys, caplog, tmp_path, sharded):
    """The same chosen layer and direction, the same counts and KL, the same capability answers, the in-memory
    run's baked tensors bit for bit; the original is freed before the edited model loads from the shards written
    (on a GPU, the edited model needs the original's memory)."""
    model, src = sharded(arch)
    code, _, err = run_cli(capsys, "run", src, "-o", tmp_path / "memory", *FAST)
    assert code == 0, err
    code, out, err = run_cli(capsys, "run", src, "-o", tmp_path / "mapped", *FAST, "--device-map", "auto",
                             "--device-memory", _half(model))
    assert code == 0, err
    assert "--device-map auto: the model's modules on" in caplog.text and "disk" in caplog.text
    assert "still referenced" not in caplog.text
    assert "how each stage ran:" in out and "evaluate edited: the shards just written" in out
    ma, mb = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("memory", "mapped"))
    assert "disk" in mb["paths"]["load"]
    assert ma["direction"]["layer"] == mb["direction"]["layer"]
    da, db = (Direction.load(tmp_path / name / "direction.safetensors") for name in ("memory", "mapped"))
    assert (da.vector - db.vector).abs().max().item() <= 1e-6
    for side in ("before", "after"):
        a, b = ma["metrics"][side], mb["metrics"][side]
        assert (a["refusals"], a["over_refusals"], a["n_harmful"]) == (b["refusals"], b["over_refusals"],
                                                                       b["n_harmful"]), side
        for k in ("kl_first", "kl_continuation"):
            assert (a[k] is None) == (b[k] is None) and (a[k] is None or math.isclose(a[k], b[k], abs_tol=1e-6)), k
    assert ma["metrics"]["after"]["kl_first"] > 0
    ca, cb = ma["capability"], mb["capability"]
    assert (ca["n"], ca["lost"], ca["gained"]) == (cb["n"], cb["lost"], cb["gained"])
    baked, written = _tensors(tmp_path / "memory"), _tensors(tmp_path / "mapped")
    assert baked.keys() == written.keys()
    assert all(torch.equal(baked[n], written[n]) for n in baked)
    original = _tensors(src)
    assert any(n in original and not torch.equal(original[n], written[n]) for n in written), "nothing was baked"


def test_device_map_bad_input(capsys, tmp_path, sharded):
    """Each a single line, exit 2, nothing written, before any model loads."""
    _, src = sharded("llama")
    out = tmp_path / "o"
    cases = [
        (("--device-map", "everywhere"), "--device-map 'everywhere' is not one of accelerate's: auto, balanced"),
        (("--device-memory", "cpu=1GB"), "--device-memory sets the budgets of --device-map"),
        (("--device-map", "auto", "--device-memory", "cpu1GB"), "'cpu1GB' is not DEVICE=SIZE"),
        (("--device-map", "auto", "--device-memory", "cpu=lots"), "--device-memory cpu= 'lots' is not a size"),
        (("--device-map", "auto", "--device-memory", "7=1GB"), "--device-memory names GPU 7, but this machine has"),
        (("--device-map", "auto", "--device", "cpu"), "--device cpu and --device-map auto both place the model"),
        (("--device-map", "auto", "--stream"), "--device-map and --stream/--max-memory are two ways"),
        (("--device-map", "auto", "--search"), "run --search does not run on a --device-map model"),
    ]
    for extra, match in cases:
        code, _, err = run_cli(capsys, "run", src, "-o", out, *FAST, *extra)
        assert_clean_error(code, err, match, out)
    code, _, err = run_cli(capsys, "run", src, "-o", tmp_path / "o.gguf", *FAST, "--device-map", "auto")
    assert_clean_error(code, err, "run --device-map writes a Hugging Face directory", tmp_path / "o.gguf")
    code, _, err = run_cli(capsys, "run", "someone/some-model", "-o", out, *FAST, "--device-map", "auto")
    assert_clean_error(code, err, "is not a local model directory: download it first", out)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    code, _, err = run_cli(capsys, "run", gguf, "-o", out, *FAST, "--device-map", "auto")
    assert_clean_error(code, err, "is a GGUF, which transformers dequantizes whole: convert it first", out)


def test_directions_device_map_is_the_in_memory_direction(capsys, tmp_path, sharded):
    model, src = sharded("qwen2")
    args = ["--n-train", "8", "--n-select", "4"]
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "a.safetensors", *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "b.safetensors", *args, "--device-map", "auto",
                           "--device-memory", _half(model))
    assert code == 0, err
    a, b = (Direction.load(tmp_path / f"{x}.safetensors") for x in "ab")
    assert a.layer == b.layer and (a.vector - b.vector).abs().max().item() <= 1e-6
