"""The CLI, in process: bad input gets one clear line, exit 2, and nothing written."""

import json
import shutil

import pytest
from conftest import FAST, assert_clean_error, run_cli


def test_nonexistent_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", tmp_path / "nope", "-o", tmp_path / "out")
    assert_clean_error(code, err, "does not exist", tmp_path / "out")


def test_directory_without_weights(capsys, tmp_path, model_dirs):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(model_dirs["llama"] / "config.json", d)
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out")
    assert_clean_error(code, err, "has no weights", tmp_path / "out")


def test_pickle_weights_refused(capsys, tmp_path, model_dirs):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(model_dirs["llama"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out")
    assert_clean_error(code, err, "--allow-pickle", tmp_path / "out")


def test_unsupported_architecture(capsys, tmp_path, model_dirs):
    d = tmp_path / "weird"
    shutil.copytree(model_dirs["llama"], d)
    config = json.loads((d / "config.json").read_text())
    # A real transformers architecture that abliterate has no entry for.
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=512, hidden_size=32, n_layer=2, n_head=2)).save_pretrained(d)
    assert config["model_type"] == "llama"
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out", *FAST)
    assert_clean_error(code, err, "--arch-spec", tmp_path / "out")
    assert "'bloom'" in err


def test_arch_spec_override_makes_it_work(capsys, tmp_path, model_dirs):
    """The override named by that error really describes a model (here: Llama, by hand)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "layers": "model.layers", "embeddings": ["model.embed_tokens"], "attn_writers": ["self_attn.o_proj"],
        "mlp_writers": ["mlp.down_proj"], "attn_hook": "self_attn.o_proj", "mlp_hook": "mlp.down_proj"}))
    code, out, err = run_cli(capsys, "directions", model_dirs["llama"], "-o", tmp_path / "d.safetensors",
                             "--arch-spec", spec, "--n-train", "8", "--n-select", "4")
    assert code == 0, err
    assert (tmp_path / "d.safetensors").is_file()
    spec.write_text(json.dumps({"layers": "model.blocks"}))
    code, _, err = run_cli(capsys, "directions", model_dirs["llama"], "-o", tmp_path / "e.safetensors",
                           "--arch-spec", spec)
    assert_clean_error(code, err, "spec", tmp_path / "e.safetensors")


def test_empty_prompt_file(capsys, tmp_path, model_dirs):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "out", "--harmful", empty)
    assert_clean_error(code, err, "empty", tmp_path / "out")


def test_csv_without_column(capsys, tmp_path, model_dirs):
    csv = tmp_path / "p.csv"
    csv.write_text("question\nHow do I bake bread?\n")
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "out", "--eval-harmless", csv,
                           "--column", "prompt")
    assert_clean_error(code, err, "no column 'prompt'", tmp_path / "out")


def test_output_equal_to_input(capsys, model_dirs):
    before = sorted(p.name for p in model_dirs["llama"].iterdir())
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", model_dirs["llama"], *FAST)
    assert_clean_error(code, err, "is the input model itself")
    assert sorted(p.name for p in model_dirs["llama"].iterdir()) == before


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    code, _, err = run_cli(capsys, "run", bad, "-o", tmp_path / "out")
    assert_clean_error(code, err, "corrupt or truncated GGUF", tmp_path / "out")
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    code, _, err = run_cli(capsys, "run", bad, "-o", tmp_path / "out")
    assert_clean_error(code, err, "not a GGUF file", tmp_path / "out")


def test_non_empty_output_needs_force(capsys, tmp_path, model_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST)
    assert_clean_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_layer_out_of_range(capsys, tmp_path, model_dirs):
    code, _, err = run_cli(capsys, "directions", model_dirs["llama"], "-o", tmp_path / "d.safetensors",
                           "--layer", "40", "--n-train", "8", "--n-select", "4")
    assert_clean_error(code, err, "layer 40 is out of range", tmp_path / "d.safetensors")


def test_directions_apply_eval_chain(capsys, tmp_path, model_dirs):
    """The building blocks compose: directions -> apply -> eval against the original and by hooks."""
    src = model_dirs["qwen2"]
    code, out, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", "--n-train", "8",
                             "--n-select", "4")
    assert code == 0, err
    assert "<- chosen" in out
    code, _, err = run_cli(capsys, "apply", src, "--direction", tmp_path / "d.safetensors", "-o", tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "direction.safetensors").is_file()
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert any("o_proj" in n for n in manifest["edited_tensors"])
    evals = []
    for extra in (["--original", src], ["--direction", tmp_path / "d.safetensors"]):
        target = tmp_path / "m" if extra[0] == "--original" else src
        js = tmp_path / f"e{len(evals)}.json"
        code, out, err = run_cli(capsys, "eval", target, *extra, "--json", js, "--n-eval-harmful", "4",
                                 "--n-eval-harmless", "4", "--max-new-tokens", "4", "--kl-tokens", "3")
        assert code == 0, err
        evals.append(json.loads(js.read_text()))
    # baked model vs original == hooks vs original (same edit, two mechanisms)
    assert evals[0]["after"]["kl_first"] == pytest.approx(evals[1]["after"]["kl_first"], rel=1e-3, abs=1e-6)
    code, _, err = run_cli(capsys, "eval", src, "--original", src, "--direction", tmp_path / "d.safetensors")
    assert_clean_error(code, err, "not both")


@pytest.mark.parametrize("flag,value,match", [
    ("--positions", "middle", "not one of: last, all"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--max-layer-frac", "1.5", "layer fractions"),
])
def test_bad_option_values_fail_before_loading(capsys, tmp_path, flag, value, match):
    code, _, err = run_cli(capsys, "run", tmp_path / "not-even-loaded", "-o", tmp_path / "out", flag, value)
    assert_clean_error(code, err, match, tmp_path / "out")
