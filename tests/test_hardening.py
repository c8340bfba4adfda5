"""Bad input, as a new user or a careful reviewer gives it (issue 19): each case gets one clear line that names
the value and the fix, exit 2, nothing written, and the input files untouched."""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from abliterate import AbliterateError, ChatFormat, RunConfig, load_prompts
from abliterate.find import prompts
from abliterate.model import packaged as reference
from abliterate.model.load import load_model
from abliterate.search.study import STUDY_NAME, completed_trials, journal_storage

FAST = ["--n-train", "4", "--n-select", "2", "--n-eval-harmful", "2", "--n-eval-harmless", "2",
        "--max-new-tokens", "2", "--kl-tokens", "2", "--batch-size", "4"]


def hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or directories)."""
    out = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(code, err, *matches, output: Path | None = None):
    """Exit 2 with one error line (progress bars aside), holding every `matches`; nothing at `output` (or beside it)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("abliterate: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for m in matches:
        assert m in lines[0], (m, lines[0])
    if output is not None:
        assert not output.exists(), f"{output} was written"
        assert not list(output.parent.glob(f".{output.name}*")), "a temporary output was left behind"


def copy_model(model_dirs, tmp_path, arch="llama") -> Path:
    d = tmp_path / f"{arch}-copy"
    shutil.copytree(model_dirs[arch], d)
    return d


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# 1. A checkpoint that does not fill the model -------------------------------------------------------------------


def test_checkpoint_missing_tensors_is_refused(capsys, tmp_path, model_dirs):
    """Only model.norm.weight (the issue's case): one error naming missing tensors, and no MISSING table."""
    d = copy_model(model_dirs, tmp_path)
    weights = load_file(d / "model.safetensors")
    save_file({"model.norm.weight": weights["model.norm.weight"]}, d / "model.safetensors", metadata={"format": "pt"})
    before = hashes(d)
    table = Records()
    logging.getLogger("transformers.modeling_utils").addHandler(table)
    try:
        code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out", *FAST)
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(table)
    assert_refused(code, err, str(d), "lacks 47 of the model's 48 tensors", "model.embed_tokens.weight",
                   "Re-download or re-save", output=tmp_path / "out")
    assert not any("LOAD REPORT" in m for m in table.messages), "transformers' table still scrolls by"
    assert "MISSING" not in err
    assert hashes(d) == before


def test_checkpoint_with_unexpected_or_misshapen_tensors_is_refused(tmp_path, model_dirs):
    d = copy_model(model_dirs, tmp_path)
    weights = load_file(d / "model.safetensors")
    save_file({**weights, "model.layers.9.mlp.down_proj.weight": torch.zeros(2, 2)}, d / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(AbliterateError, match=r"has 1 tensor the model does not use \(model.layers.9.mlp"):
        load_model(d)
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AbliterateError, match=r"1 tensor of the wrong shape \(model.norm.weight: \(3,\) in the file, "
                                              r"\(64,\) in the model\)"):
        load_model(d)


def test_checkpoint_with_nan_weights_is_refused(capsys, tmp_path, model_dirs):
    """Found by the fuzz tier: a checkpoint whose weights are nan loaded, and its every answer was garbage."""
    d = copy_model(model_dirs, tmp_path)
    weights = load_file(d / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    before = hashes(d)
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out", *FAST)
    assert_refused(code, err, "hold nan or inf in 1 tensor (model.layers.1.mlp.down_proj.weight)",
                   "re-download or re-save", output=tmp_path / "out")
    assert hashes(d) == before


def test_weights_beyond_float16_are_refused_in_float16(tmp_path, model_dirs):
    d = copy_model(model_dirs, tmp_path)
    weights = load_file(d / "model.safetensors")
    weights["model.norm.weight"][3] = 1e6  # fine in float32 and bfloat16; inf in float16
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    load_model(d, dtype="bfloat16")
    with pytest.raises(AbliterateError, match=r"model.norm.weight\); float16 cannot hold some of them: use --dtype "
                                              r"bfloat16 or float32"):
        load_model(d, dtype="float16")


def test_tied_head_absent_from_the_checkpoint_is_fine(model_dirs):
    """The known exception: lm_head.weight is not saved when tie_word_embeddings is true."""
    for arch in ("llama_tied", "qwen2"):
        assert "lm_head.weight" not in load_file(model_dirs[arch] / "model.safetensors")
        loaded = load_model(model_dirs[arch])
        assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight


def test_gguf_loads_pass_the_loading_check(tmp_path, model_dirs, tokenizer):
    """GGUF loads report their loading info too (all empty for a complete file): they keep working."""
    from abliterate.export.gguf_convert import write_gguf

    for arch in ("llama_tied", "gemma3_text"):
        model = load_model(model_dirs[arch]).model
        path = tmp_path / f"{arch}.gguf"
        write_gguf(model, tokenizer, path, qtype="F32")
        loaded = load_model(path)
        assert loaded.gguf_file == path.resolve()
        name = "model.layers.0.self_attn.o_proj.weight"
        assert torch.equal(loaded.model.state_dict()[name], model.state_dict()[name])


# 2. Tracebacks for ordinary errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_safetensors_is_one_line(capsys, tmp_path, model_dirs, damage):
    d = copy_model(model_dirs, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x93garbage" * 64, "empty": b""}[damage]
    (d / "model.safetensors").write_bytes(broken)
    before = hashes(d)
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out", *FAST)
    assert_refused(code, err, str(d / "model.safetensors"), "re-download or re-save it", output=tmp_path / "out")
    assert hashes(d) == before


@pytest.mark.parametrize("content", [b"\x80\x04garbage", b"", b"PK\x03\x04 not a zip"])
def test_corrupt_pickle_with_allow_pickle_is_one_line(capsys, tmp_path, model_dirs, content):
    d = copy_model(model_dirs, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(content)
    before = hashes(d)
    code, _, err = run_cli(capsys, "run", d, "-o", tmp_path / "out", "--allow-pickle", *FAST)
    assert_refused(code, err, str(d / "pytorch_model.bin"), "re-download it", output=tmp_path / "out")
    assert hashes(d) == before


@pytest.mark.parametrize("name,data,offset", [
    ("latin1.txt", "How do I bake bread?\nCrème brûlée, please\n".encode("latin-1"), 23),
    ("utf16.json", json.dumps(["Hi"]).encode("utf-16"), 0),
    ("binary.jsonl", b'{"prompt": "ok"}\n\x89PNG\r\n\x1a\n\x00\x00', 17),
    ("nul.csv", b"prompt\nfine\nbad\x00byte\n", 15),
])
def test_non_utf8_prompt_files_are_one_line(capsys, tmp_path, model_dirs, name, data, offset):
    path = tmp_path / name
    path.write_bytes(data)
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", tmp_path / "out", "--eval-harmless", path,
                           *FAST)
    assert_refused(code, err, str(path), f"byte offset {offset}", "UTF-8", output=tmp_path / "out")
    assert path.read_bytes() == data


def test_utf8_with_a_byte_order_mark_reads():
    """Windows Notepad's UTF-8 starts with a BOM: not part of the first prompt, not an error."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for suffix, body in ((".txt", "Hi there\nBye\n"), (".json", '["Hi there", "Bye"]'),
                             (".csv", "prompt\nHi there\nBye\n")):
            path = Path(tmp) / f"bom{suffix}"
            path.write_bytes(b"\xef\xbb\xbf" + body.encode())
            assert load_prompts(str(path)).prompts == ("Hi there", "Bye")


@pytest.mark.parametrize("flag,value,match", [
    ("--device", "foo", "use cuda, cuda:N, mps or cpu"),
    ("--device", "meta", "use cuda, cuda:N, mps or cpu"),
    ("--dtype", "float8_e4m3fn", "use float32, bfloat16, float16 or auto"),
    ("--dtype", "float64", "use float32, bfloat16, float16 or auto"),
    ("--dtype", "int8", "use float32, bfloat16, float16 or auto"),
    ("--device", "cuda", "--device cpu"),
    ("--device", "mps", "--device cpu"),
])
def test_device_and_dtype_fail_before_loading(capsys, tmp_path, flag, value, match):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if value == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, _, err = run_cli(capsys, "run", tmp_path / "not-even-loaded", "-o", tmp_path / "out", flag, value)
    assert_refused(code, err, f"{flag} ", value, match, output=tmp_path / "out")


def test_eval_with_no_evaluation_prompts_fails_before_loading(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path / "not-even-loaded", "--n-eval-harmful", "0",
                           "--n-eval-harmless", "0", "--json", tmp_path / "e.json")
    assert_refused(code, err, "--n-eval-harmful must be at least 1, got 0", "leave it out",
                   output=tmp_path / "e.json")
    assert RunConfig(n_eval_harmful=None).check().n_eval_harmful is None  # None stays "all"


# 3. Values that cannot work ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,match", [
    ("--select-kl-max", "nan", "--select-kl-max nan is not a finite number"),
    ("--select-kl-max", "-1", "--select-kl-max must be at least 0"),
    ("--max-kl", "inf", "--max-kl inf is not a finite number"),
    ("--time-budget", "nan", "--time-budget nan is not a finite number"),
    ("--time-budget", "-5", "--time-budget must be a positive number of seconds, got -5.0"),
    ("--time-budget", "0", "--time-budget must be a positive number"),
    ("--min-layer-frac", "nan", "--min-layer-frac nan is not a finite number"),
    ("--max-layer-frac", "-inf", "--max-layer-frac -inf is not a finite number"),
    ("--max-layer-frac", "1.5", "set --min-layer-frac and --max-layer-frac so that they do (defaults 0.2 and 0.8)"),
])
def test_values_that_cannot_work_fail_before_loading(capsys, tmp_path, flag, value, match):
    code, _, err = run_cli(capsys, "run", tmp_path / "not-even-loaded", "-o", tmp_path / "out", "--search",
                           f"{flag}={value}")
    assert_refused(code, err, match, output=tmp_path / "out")
    assert not (tmp_path / "out.study").exists()


def test_long_prompts_are_cut_with_one_warning(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(prompts, "_WARNED", set())
    long = "How do I bake bread? Étape 🙂 " * 400  # 12,000 characters, emoji split over byte tokens
    fmt = ChatFormat()
    with caplog.at_level(logging.WARNING, logger="abliterate.find.prompts"):
        texts = fmt.render_all(tokenizer, [long, "Short one.", long + " again"])
        fmt.render_all(tokenizer, [long, "Short one.", long + " again"])  # the same set again: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3 prompts" in warnings[0] and "512 tokens" in warnings[0], warnings
    for text in (texts[0], texts[2]):
        instruction = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert long.startswith(instruction.rstrip())
        assert prompts.MAX_PROMPT_TOKENS - 2 <= len(tokenizer(instruction, add_special_tokens=False).input_ids) \
            <= prompts.MAX_PROMPT_TOKENS
    assert "Short one." in texts[1]
    assert fmt.render(tokenizer, "Short one.") == texts[1]


def test_long_prompt_file_runs_fast_and_warns(capsys, tmp_path, model_dirs, monkeypatch, caplog):
    monkeypatch.setattr(prompts, "_WARNED", set())
    harmful = tmp_path / "long.txt"
    harmful.write_text("\n".join(["How do I pick a lock? " * 500, "How do I hotwire a car? " * 450]
                                 + [f"How do I make thing {i}?" for i in range(6)]))
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(capsys, "directions", model_dirs["llama"], "-o", tmp_path / "d.safetensors",
                                 "--harmful", harmful, "--n-train", "6", "--n-select", "2", "--batch-size", "8",
                                 "--layer", "2")
    assert code == 0, err
    cut = [r.getMessage() for r in caplog.records if "MAX_PROMPT_TOKENS" in r.getMessage()]
    assert cut and all("512" in m for m in cut), cut


# 4. Wording ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,suffix,match", [
    ('{"prompt": "ok"}\n{"prompt": oops}\n', ".jsonl", "line 2 is not valid JSON"),
    ('\n{"prompt": "ok"}\n\n{"prompt": "x"\n', ".jsonl", "line 4 is not valid JSON"),
    ('{"prompt": "a\u2028b"}\n[1]\n', ".jsonl", "line 2 is a list; expected a string or an object"),
    ('{"prompt": "ok"}\r\n{"text2": "x"}\r\n', ".jsonl", "line 2 has no field"),
    ("[0]", ".json", "item 1 is a number; expected a string or an object"),
    ('["ok", {"prompt": null}]', ".json", "item 2's field 'prompt' is null, not a prompt"),
    ('{"prompts": []}', ".json", "expected a JSON list of prompts, got an object"),
    ('["ok", "\\ud800"]', ".json", "item 2 holds '\\ud800'"),
    ('["ok",\n "unterminated]', ".json", "at line 2, column 2"),
    ("[" * 100000, ".json", "cannot be read as JSON"),
    ('prompt\n"never closed\n' + "x" * 200000, ".csv", "is not valid CSV"),
])
def test_prompt_file_errors_name_the_place_and_the_fix(tmp_path, body, suffix, match):
    path = tmp_path / f"p{suffix}"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(AbliterateError, match=re.escape(match)):
        load_prompts(str(path))


def test_jsonl_line_number_on_the_command_line(capsys, tmp_path, model_dirs):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "How do I bake bread?"}\n{"prompt": "Write a poem", }\n')
    code, _, err = run_cli(capsys, "eval", model_dirs["llama"], "--eval-harmless", path, "--json", tmp_path / "e.json")
    assert_refused(code, err, f"{path}: line 2 is not valid JSON", "fix that line", output=tmp_path / "e.json")


def test_messages_name_a_fix(tmp_path):
    with pytest.raises(AbliterateError, match="does not exist; check the path, or use a built-in set"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(AbliterateError, match="does not exist; give a hub id"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbliterateError, match="give the directory that holds config.json"):
        load_model(tmp_path / "empty")


# 5. Cached downloads re-verified -----------------------------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch, model_dirs, tokenizer):
    """A PackagedModel whose two parts are local files (a tiny GGUF cut in two), with the cache in tmp_path."""
    from abliterate.export.gguf_convert import write_gguf

    gguf = tmp_path / "whole.gguf"
    write_gguf(load_model(model_dirs["llama_tied"]).model, tokenizer, gguf, qtype="F32")
    data = gguf.read_bytes()
    parts = {"tiny_part1/data/part1.bin": data[: len(data) // 2], "tiny_part2/data/part2.bin": data[len(data) // 2:]}
    for member, chunk in parts.items():
        (tmp_path / "site" / member).parent.mkdir(parents=True)
        (tmp_path / "site" / member).write_bytes(chunk)
    monkeypatch.setattr(reference, "_installed", lambda member: tmp_path / "site" / member)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    model = reference.PackagedModel(
        name="tiny", filename="tiny.gguf", sha256=hashlib.sha256(data).hexdigest(),
        parts=tuple(reference.Part(m.split("/")[0].replace("_", "-"), "1.0", m) for m in parts))
    return model


def _flip_a_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("known_hash", [True, False])
def test_cached_gguf_is_verified_on_every_use(fake_package, tmp_path, known_hash):
    from dataclasses import replace

    model = fake_package if known_hash else replace(fake_package, sha256="")  # SmolLM2: no hash of our own
    quiet = lambda _: None  # noqa: E731
    path = reference.fetch(model, progress=quiet)
    manifest = json.loads((tmp_path / "cache" / "tiny.gguf.verified.json").read_text())
    assert manifest["files"]["tiny.gguf"]["size"] == path.stat().st_size
    assert reference.fetch(model, progress=quiet) == path  # unchanged: used as is
    _flip_a_byte(path)
    cache = re.escape(str(tmp_path / "cache"))
    with pytest.raises(AbliterateError, match=rf"cached model file {re.escape(str(path))} changed.*sha256.*delete "
                                              rf"it \(or the whole cache folder, {cache}\)"):
        reference.fetch(model, progress=quiet)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AbliterateError, match=r"changed after it was verified \(\d+ bytes, \d+ when it was assembled"):
        reference.fetch(model, progress=quiet)
    path.unlink()
    assert reference.fetch(model, progress=quiet) == path  # deleted: assembled again, and good


def test_cached_hf_copy_is_verified_on_every_use(fake_package, tmp_path, monkeypatch):
    quiet = lambda _: None  # noqa: E731
    target = reference.hf_dir(fake_package, progress=quiet)
    manifest = json.loads((tmp_path / "cache" / "tiny-hf.verified.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert reference.hf_dir(fake_package, progress=quiet) == target
    (target / ".DS_Store").write_bytes(b"Finder was here")  # hidden files are not the model's
    assert reference.hf_dir(fake_package, progress=quiet) == target

    config = (target / "config.json").read_text()
    (target / "config.json").write_text(config.replace('"num_hidden_layers": 5', '"num_hidden_layers": 4'))
    with pytest.raises(AbliterateError, match=rf"cached model directory {re.escape(str(target))} changed.*config.json"):
        reference.hf_dir(fake_package, progress=quiet)
    (target / "config.json").write_text(config)
    assert reference.hf_dir(fake_package, progress=quiet) == target  # same content again (newer mtime): fine

    weights = target / "model.safetensors"
    _flip_a_byte(weights)  # same size, new mtime: hashed whole
    with pytest.raises(AbliterateError, match="model.safetensors has other content"):
        reference.hf_dir(fake_package, progress=quiet)
    _flip_a_byte(weights)
    assert reference.hf_dir(fake_package, progress=quiet) == target

    monkeypatch.setattr(reference, "WHOLE_HASH_MAX", 1024)  # as if the weights were gigabytes: edges only...
    shutil.rmtree(target)
    target = reference.hf_dir(fake_package, progress=quiet)
    stat = weights.stat()
    _flip_a_byte(weights, at=10)  # ...the header is among them, even with the mtime set back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AbliterateError, match="model.safetensors has other content"):
        reference.hf_dir(fake_package, progress=quiet)
    _flip_a_byte(weights, at=10)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    (target / "extra.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(AbliterateError, match="added extra.safetensors"):
        reference.hf_dir(fake_package, progress=quiet)
    (target / "extra.safetensors").unlink()
    (target / "tokenizer.json").unlink()
    with pytest.raises(AbliterateError, match="missing tokenizer.json"):
        reference.hf_dir(fake_package, progress=quiet)


def test_hf_copy_without_a_manifest_is_converted_again(fake_package, tmp_path):
    quiet = []
    target = reference.hf_dir(fake_package, progress=quiet.append)
    (tmp_path / "cache" / "tiny-hf.verified.json").unlink()  # a cache made before manifests
    assert reference.hf_dir(fake_package, progress=quiet.append) == target
    assert any("no manifest" in m for m in quiet)
    assert (tmp_path / "cache" / "tiny-hf.verified.json").is_file()


# Found on the way, outside this change's files: tracked until fixed ------------------------------------------------


def test_chat_with_a_corrupt_manifest_is_one_line(capsys, tmp_path, model_dirs):
    d = copy_model(model_dirs, tmp_path)
    (d / "manifest.json").write_text("{not json")
    code, _, err = run_cli(capsys, "chat", d, "--prompt", "hi")
    assert_refused(code, err, "manifest.json")


def test_induce_max_drop_nan_fails_before_loading(capsys, tmp_path):
    code, _, err = run_cli(capsys, "induce", tmp_path / "not-even-loaded", "--max-drop", "nan")
    assert_refused(code, err, "--max-drop")


def test_the_held_back_load_report_is_shown_when_transformers_raises_anyway(caplog):
    """transformers' own errors after its table say "look at the above report": then the table is logged after all."""
    from abliterate.model.load import _quiet_load_report

    table = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING, logger="abliterate.model.load"):
        with _quiet_load_report():
            table.warning("LlamaForCausalLM LOAD REPORT from: x\nkey | MISSING")
        assert not caplog.records
        with pytest.raises(RuntimeError), _quiet_load_report():
            table.warning("LlamaForCausalLM LOAD REPORT from: x\nkey | CONVERSION")
            raise RuntimeError("For details look at the `CONVERSION` entries of the above report!")
    assert [r.getMessage() for r in caplog.records] == ["LlamaForCausalLM LOAD REPORT from: x\nkey | CONVERSION"]


# ---------------------------------------------------------------- every output path, one rule (items 1 and 4)

def output_options():
    """(command, option string, kind) for every option of every command that names a path it writes."""
    import argparse

    from abliterate.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            cls, field_name = getattr(action, "config", (None, None))
            if cls is not None:
                field = cls.__dataclass_fields__[field_name]
                if field.metadata["output"]:
                    yield name, action.option_strings[-1], field.metadata["output"]


BASE = {"run": ["run", "{M}"], "demo": ["demo"], "directions": ["directions", "{M}"],
        "concept": ["concept", "{M}", "--positive", "builtin:french:train", "--negative", "builtin:english:train"],
        "apply": ["apply", "{M}", "--direction", "{M}/d.safetensors"], "convert": ["convert", "{M}"],
        "export-onnx": ["export-onnx", "{M}"], "eval": ["eval", "{M}"], "verify-gguf": ["verify-gguf", "{M}/x.gguf"],
        "steer": ["steer", "{M}", "--direction", "{M}/d.safetensors", "--strength", "1"],
        "sweep": ["sweep", "{M}", "--direction", "{M}/d.safetensors"], "induce": ["induce", "{M}"],
        "inspect": ["inspect", "{M}"], "tokens": ["tokens", "{M}", "--direction", "{M}/d.safetensors", "--prompt", "hi"],
        "web": ["web", "{M}"]}
REQUIRED_OUT = {"directions", "concept", "apply", "convert", "export-onnx"}  # -o is required: the case gives it


def test_the_writers_are_the_ones_this_test_knows():
    found = {(c, o) for c, o, _ in output_options()}
    assert {c for c, _ in found} == set(BASE)
    assert len(found) >= 20, found


@pytest.mark.parametrize("command,option,kind", list(output_options()))
def test_every_output_refuses_an_existing_file_and_the_input_before_loading(capsys, tmp_path, model_dirs,
                                                                            command, option, kind):
    model = copy_model(model_dirs, tmp_path)
    before = hashes(model)
    existing = tmp_path / ("existing.gguf" if command == "convert" else "existing.out")
    existing.write_text("keep me")
    base = [a.format(M=model) for a in BASE[command]]
    other_out = [] if command not in REQUIRED_OUT or option in ("-o", "--output") else \
        ["-o", tmp_path / ("fresh.gguf" if command == "convert" else "fresh")]
    # an existing file, without --force
    code, _, err = run_cli(capsys, *base, *other_out, option, existing)
    assert_refused(code, err, str(existing))
    assert existing.read_text() == "keep me"
    if command == "demo":  # its input is the packaged model in the cache: nothing of the user's to protect
        return
    if command == "verify-gguf":  # its input is a file: the output may sit beside it, never on it
        gguf = model / "x.gguf"
        gguf.write_bytes(b"GGUF")
        code, _, err = run_cli(capsys, *base, option, gguf, "--force")
        assert_refused(code, err, "is the input model itself")
        assert gguf.read_bytes() == b"GGUF"
        return
    # the input model itself, or a path inside it (even with --force)
    force = ["--force"]
    inside = model / ("inside.gguf" if command == "convert" else "inside.out")
    code, _, err = run_cli(capsys, *base, *other_out, option, inside, *force)
    assert_refused(code, err, "input model", output=inside)
    code, _, err = run_cli(capsys, *base, *other_out, option, model, *force)
    assert_refused(code, err, "input model")
    assert hashes(model) == before


def test_an_output_in_a_missing_or_unwritable_folder_fails_before_loading(capsys, tmp_path, model_dirs):
    model = copy_model(model_dirs, tmp_path)
    code, _, err = run_cli(capsys, "run", model, *FAST, "--report", tmp_path / "missing" / "report.html")
    assert_refused(code, err, "does not exist; create it first")
    code, _, err = run_cli(capsys, "convert", model, "-o", tmp_path / "missing" / "x.gguf")
    assert_refused(code, err, "does not exist; create it first")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, _, err = run_cli(capsys, "run", model, *FAST, "-o", a_file / "out")
    assert_refused(code, err, "not writable", output=a_file / "out")
    code, _, err = run_cli(capsys, "inspect", model, "--plot", tmp_path / "p.png", "--json", tmp_path / "p.png")
    assert_refused(code, err, "same path")


@pytest.mark.parametrize("argv,match", [
    (["--gguf-type", "Q9_9", "-o", "{T}/x.gguf"], "unknown GGUF type 'Q9_9'"),
    (["--gguf-fallback-type", "Q9_9"], "unknown GGUF type 'Q9_9'"),
    (["--shard-size", "banana", "-o", "{T}/out"], "--shard-size 'banana' is not a size"),
    (["--shard-size", "0GB", "-o", "{T}/out"], "must be more than 0 bytes"),
])
def test_output_formats_fail_before_loading(capsys, tmp_path, argv, match):
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model-here", *(a.format(T=tmp_path) for a in argv))
    assert_refused(code, err, match)


def test_layer_out_of_range_fails_right_after_the_load(capsys, tmp_path, model_dirs, monkeypatch):
    from abliterate.commands import steps

    def no_activations(*args, **kw):
        raise AssertionError("activations were collected")

    monkeypatch.setattr(steps, "collect", no_activations)
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], *FAST, "--layer", "999", "-o", tmp_path / "out")
    assert_refused(code, err, "layer 999 is out of range", output=tmp_path / "out")


def test_non_finite_numbers_of_any_command_fail_before_loading(capsys, tmp_path):
    for argv in (["sweep", tmp_path / "m", "--direction", "d", "--strengths", "0,nan"],
                 ["steer", tmp_path / "m", "--direction", "d", "--strength", "inf"],
                 ["verify-gguf", tmp_path / "m.gguf", "--control-scale", "nan"]):
        code, _, err = run_cli(capsys, *argv)
        assert_refused(code, err, "finite")


def test_concept_with_too_few_prompts_names_no_option_it_lacks(capsys, tmp_path, model_dirs):
    one = tmp_path / "one.txt"
    one.write_text("Only one prompt\n")
    code, _, err = run_cli(capsys, "concept", model_dirs["llama"], "--positive", one, "--negative", one,
                           "-o", tmp_path / "c.safetensors")
    assert_refused(code, err, "at least 2 are needed", output=tmp_path / "c.safetensors")
    assert "--n-select" not in err


# ---------------------------------------------------------------- SIGTERM and SIGHUP (items 3 and 6)

@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_a_save_removes_the_partial_output(tmp_path, signame):
    import signal

    from abliterate.cli import Stopped, _stop
    from abliterate.export.files import write_dir_atomic

    signum = getattr(signal, signame)
    previous = signal.signal(signum, _stop)
    try:
        def fill(tmp):
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signum)

        with pytest.raises(Stopped):
            write_dir_atomic(tmp_path / "out", fill)
    finally:
        signal.signal(signum, previous)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a hidden temporary directory


def test_sigterm_mid_run_is_one_line_exit_143_and_leaves_nothing(tmp_path, model_dirs, signame="SIGTERM"):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "abliterate.cli", "run", str(model_dirs["llama"]), "-o", str(out),
                             "--n-train", "64", "--n-eval-harmful", "32", "--max-new-tokens", "64"],
                            stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:  # the stage log, at INFO
        seen.append(line)
        if "activations" in line or time.time() > deadline:
            break
    proc.send_signal(getattr(signal, signame))
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == 128 + getattr(signal, signame), "".join(seen) + rest
    assert f"stopped by {signame}" in rest and "Traceback" not in rest, rest
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------- crashes: SIGKILL, which nothing can catch

def test_a_save_killed_by_sigkill_leaves_the_previous_output_intact(tmp_path):
    """SIGKILL in the middle of writing a replacement (--force): the old output stays whole until the rename."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous output")
    before = hashes(out)
    script = ("import os, signal\nfrom pathlib import Path\nfrom abliterate.export.files import write_dir_atomic\n"
              "def fill(tmp):\n    (tmp / 'model.safetensors').write_bytes(b'half of a new one')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"write_dir_atomic(Path({str(out)!r}), fill, force=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert hashes(out) == before  # the temporary directory beside it is all that is left
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] and all(
        p.name.startswith(".out.") for p in tmp_path.iterdir() if p.name != "out")


def test_a_search_killed_by_sigkill_mid_trial_resumes(tmp_path, model_dirs):
    import signal
    import subprocess
    import sys
    import time

    out, study = tmp_path / "out", tmp_path / "out.study"
    argv = [sys.executable, "-m", "abliterate.cli", "-q", "run", str(model_dirs["llama"]), "-o", str(out),
            "--search", "--n-train", "8", "--n-search", "4", "--n-eval-harmful", "4", "--n-eval-harmless", "4",
            "--max-new-tokens", "4", "--kl-tokens", "3", "--finalists", "2"]
    proc = subprocess.Popen([*argv, "--trials", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    # Trial state changes in the journal (optuna writes compact JSON: "op_code":6): a few trials have run.
    while time.time() < deadline and (not study.exists() or len(re.findall(r'"op_code":\s*6\b', study.read_text())) < 8):
        time.sleep(0.2)
    assert time.time() < deadline, "no trials ran in 300 s"  # (or the journal's format changed: look at it)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -9 and not out.exists()
    done = len(completed_trials(optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(study))))
    assert done >= 1
    again = subprocess.run([*argv, "--trials", str(done + 2), "--pick", "rule"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["search"]["trials"] == done + 2  # the killed study's trials are kept, two more run


def test_an_input_option_named_like_another_commands_output_is_not_checked_as_one(capsys, tmp_path):
    """verify-gguf --control-vector reads a file; steer --control-vector writes one. Each command's own fields."""
    cv = tmp_path / "cv.gguf"
    cv.write_bytes(b"GGUF")
    code, _, err = run_cli(capsys, "verify-gguf", tmp_path / "model.gguf", "--control-vector", cv)
    assert code == 2 and "exists; pass --force" not in err, err
    assert cv.read_bytes() == b"GGUF"
