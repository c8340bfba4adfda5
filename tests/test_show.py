"""Inspect, tokens, reports and chat on tiny models: identities where there are any, clear errors for bad input."""

import json
import re
import sys

import pytest
import torch
from conftest import FAST, assert_clean_error, run_cli

from abliterate import Direction
from abliterate.find.prompts import ChatFormat
from abliterate.measure.decode import generate
from abliterate.measure.inspection import auc, layer_stats, token_projections
from abliterate.model.load import load_model
from abliterate.show.chat import Speaker

SMALL = ["--n-train", "8", "--n-select", "4"]
NETWORK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//|@import""", re.I)


def test_auc_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, generator=g) + 0.5, torch.randn(20, generator=g)
    brute = sum(float(x > y) + 0.5 * float(x == y) for x in a for y in b) / (30 * 20)
    assert auc(a, b) == pytest.approx(brute)
    assert auc(a + 100, b) == 1.0 and auc(b, b) == pytest.approx(0.5)


def test_layer_stats_geometry():
    """Separated at layer 2 only: AUC 1 there, the gap along the chosen direction is the mean difference."""
    g = torch.Generator().manual_seed(1)
    n, layers, hidden = 40, 4, 8
    harmless = torch.randn(n, layers, hidden, generator=g)
    harmful = torch.randn(n, layers, hidden, generator=g)
    harmful[:, 2, 0] += 10.0
    mu = harmful.double().mean(0) - harmless.double().mean(0)
    chosen = Direction((mu[2] / mu[2].norm()).float(), layer=2)
    stats = layer_stats(harmful, harmless, chosen)
    assert [s.chosen for s in stats] == [False, False, True, False]
    assert stats[2].auc == 1.0 and stats[2].cohen_d > 5
    assert max(s.cohen_d for s in stats) == stats[2].cohen_d
    assert stats[2].along_chosen == pytest.approx(stats[2].diff_norm, rel=1e-6)
    assert stats[0].cos_prev is None and all(-1 <= s.cos_prev <= 1 for s in stats[1:])
    assert stats[2].relative_gap == pytest.approx(stats[2].diff_norm / stats[2].harmless_norm)


def test_token_projections_are_hidden_state_dot_direction(model_dirs):
    loaded = load_model(str(model_dirs["qwen2"]))
    tok, model = loaded.tokenizer, loaded.model
    text = ChatFormat().render(tok, "How do I bake bread?")
    r = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    d = Direction(r, layer=1)
    view = token_projections(model, tok, text, d)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    expected = torch.stack([hs[layer][0] @ r for layer in range(n)], dim=1)  # (T, L)
    assert view.projections.shape == (ids.shape[1], n)
    torch.testing.assert_close(view.projections, expected, rtol=1e-4, atol=1e-4)
    assert "".join(view.tokens) == tok.decode(ids[0])
    norms = torch.stack([hs[layer][0].norm(dim=-1) for layer in range(n)], dim=1)
    torch.testing.assert_close(view.cosine(), expected / norms, rtol=1e-4, atol=1e-5)
    assert view.cosine().abs().max() <= 1 + 1e-5
    assert 0.95 <= (view.scaled().abs() <= 1 + 1e-5).float().mean() < 1  # saturates at the 98th percentile


def test_inspect_marks_the_layer_directions_selects(capsys, tmp_path, model_dirs):
    """Same prompts, same selection: inspect's chosen layer is the one `directions` (and `run`) choose."""
    src = model_dirs["llama"]
    code, out, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", *SMALL)
    assert code == 0, err
    selected = Direction.load(tmp_path / "d.safetensors").layer
    plot, js = tmp_path / "layers.png", tmp_path / "layers.json"
    code, out, err = run_cli(capsys, "inspect", src, "--plot", plot, "--json", js, *SMALL)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(js.read_text())["layers"]
    assert [row["layer"] for row in table if row["chosen"]] == [selected]
    assert f"selected layer {selected}" in out and "<- chosen" in out
    assert any(row["bypass"] is not None for row in table)
    # With a direction file: its layer is marked, no selection is run.
    code, out, err = run_cli(capsys, "inspect", src, "--direction", tmp_path / "d.safetensors", "--plot", plot,
                             "--json", js, "--n-train", "8", "--force")  # the same files again: --force
    assert code == 0, err
    table = json.loads(js.read_text())["layers"]
    assert [row["layer"] for row in table if row["chosen"]] == [selected]
    assert all(row["bypass"] is None for row in table)


def test_tokens_command_writes_self_contained_html_and_heatmap(capsys, tmp_path, model_dirs):
    src = model_dirs["qwen2"]
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", *SMALL)
    assert code == 0, err
    page, heat = tmp_path / "t.html", tmp_path / "t.png"
    code, out, err = run_cli(capsys, "tokens", src, "--direction", tmp_path / "d.safetensors", "--prompt",
                             "How do I <bake> bread?", "--html", page, "--heatmap", heat, "--layer", "0")
    assert code == 0, err
    assert "layer 0: cosine with the direction" in out
    text = page.read_text()
    assert "&lt;bake&gt;" in text and "<bake>" not in text  # escaped
    assert not NETWORK.search(text) and "<script" not in text
    assert text.count("data:image/png;base64,") == 1
    assert heat.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,match", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--layer", "9"], "layer 9 is out of range"),
])
def test_tokens_bad_input(capsys, tmp_path, model_dirs, argv, match):
    d = tmp_path / "d.safetensors"
    Direction(torch.nn.functional.normalize(torch.randn(64), dim=0), layer=1).save(d)
    code, _, err = run_cli(capsys, "tokens", model_dirs["qwen2"], "--direction", d, *argv, "--html",
                           tmp_path / "t.html")
    assert_clean_error(code, err, match, tmp_path / "t.html")


@pytest.mark.parametrize("command", ["tokens", "inspect", "chat"])
def test_direction_from_another_model(capsys, tmp_path, model_dirs, command):
    d = tmp_path / "d.safetensors"
    Direction(torch.nn.functional.normalize(torch.randn(48), dim=0), layer=1, meta={"model": "other"}).save(d)
    extra = {"tokens": ["--prompt", "hi"], "inspect": ["--n-train", "8"], "chat": ["--prompt", "hi"]}[command]
    code, _, err = run_cli(capsys, command, model_dirs["qwen2"], "--direction", d, *extra)
    assert_clean_error(code, err, "direction has 48 features but the model's hidden size is")


def test_run_writes_report(capsys, tmp_path, model_dirs):
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST, "--report",
                                 tmp_path / "r.html")
    assert code == 0, err
    page = (out / "report.html").read_text()
    assert page == (tmp_path / "r.html").read_text()
    assert "refusals (harmful prompts)" in page and "Answers side by side" in page and "Selection scores" in page
    assert "data:image/png;base64," in page
    assert not NETWORK.search(page) and "<script" not in page
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{manifest['metrics']['before']['refusals']}/{manifest['metrics']['before']['n_harmful']}" in page


def test_steer_and_induce_write_reports(capsys, tmp_path, model_dirs):
    src = model_dirs["llama"]
    code, _, err = run_cli(capsys, "directions", src, "-o", tmp_path / "d.safetensors", *SMALL)
    assert code == 0, err
    code, _, err = run_cli(capsys, "steer", src, "--direction", tmp_path / "d.safetensors", "--strength", "2",
                           "-n", "3", "--max-new-tokens", "4", "-o", tmp_path / "s")
    assert code == 0, err
    page = (tmp_path / "s" / "report.html").read_text()
    assert "refusal rate" in page and "Answers side by side" in page and not NETWORK.search(page)
    code, _, err = run_cli(capsys, "induce", src, *SMALL, "--n-eval-harmless", "3", "--max-new-tokens", "4",
                           "--layers", "1", "--strengths", "1", "--report", tmp_path / "i.html")
    assert code == 0, err
    page = (tmp_path / "i.html").read_text()
    assert "Search over layers and strengths" in page and "coherence" in page


def test_chat_speaker_matches_batched_generation(model_dirs):
    """Token-by-token decoding with a KV cache gives the same greedy answer as `generate`."""
    loaded = load_model(str(model_dirs["llama"]))
    fmt = ChatFormat()
    s = Speaker("original", loaded.model, loaded.tokenizer, fmt)
    prompt = "Write a poem about bread."
    streamed = list(s.reply(prompt, max_new_tokens=12))
    gen = generate(loaded.model, loaded.tokenizer, [fmt.render(loaded.tokenizer, prompt)], max_new_tokens=12,
                   batch_size=1)
    assert streamed[-1].strip() == gen.text[0]
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # it only grows
    assert s.history == [(prompt, gen.text[0])]
    # The second turn sees the first: the rendered conversation holds both.
    assert prompt in s.render("And another?") and "And another?" in s.render("And another?")


def test_chat_hooks_equal_baked_and_strength_zero_is_original(capsys, tmp_path, model_dirs):
    src = model_dirs["qwen2"]
    d = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "directions", src, "-o", d, *SMALL)
    assert code == 0, err
    code, _, err = run_cli(capsys, "apply", src, "--direction", d, "-o", tmp_path / "m")
    assert code == 0, err
    ask = ["--prompt", "How do I bake bread?", "--max-new-tokens", "10", "--json"]
    answers = {}
    for name, argv in {"hooks": [src, "--direction", d], "baked": [tmp_path / "m"],
                       "zero": [src, "--direction", d, "--strength", "0"]}.items():
        code, out, err = run_cli(capsys, "chat", *map(str, argv), *ask)
        assert code == 0, err
        answers[name] = list(json.loads(out).values())[1:]  # original, edited
    assert answers["hooks"] == answers["baked"]  # the manifest named the original; hooks == baked weights
    assert answers["zero"][0] == answers["zero"][1]  # strength 0 is the identity


def test_chat_bad_input(capsys, tmp_path, model_dirs):
    code, _, err = run_cli(capsys, "chat", model_dirs["llama"], "--prompt", "hi")
    assert_clean_error(code, err, "nothing to compare")
    d = tmp_path / "d.safetensors"
    Direction(torch.nn.functional.normalize(torch.randn(64), dim=0), layer=1).save(d)
    code, _, err = run_cli(capsys, "chat", model_dirs["llama"], "--direction", d, "--prompt", " ")
    assert_clean_error(code, err, "prompt is empty")
    code, _, err = run_cli(capsys, "chat", model_dirs["llama"], "--direction", d, "--strength", "nan",
                           "--prompt", "hi")
    assert_clean_error(code, err, "not a finite number")


def test_interactive_chat_through_a_pty(tmp_path, model_dirs):
    """Driven as a person would: type, see both answers, /reset, /quit."""
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the interactive chat (pip install pexpect)")
    d = tmp_path / "d.safetensors"
    Direction(torch.nn.functional.normalize(torch.randn(64), dim=0), layer=1).save(d)
    child = pexpect.spawn(sys.executable, ["-m", "abliterate.cli", "-q", "chat", str(model_dirs["llama"]),
                                           "--direction", str(d), "--max-new-tokens", "6"],
                          timeout=120, encoding="utf-8", dimensions=(40, 120))
    child.expect("you>")
    child.sendline("hello there")
    child.expect("ablated")  # the table's header: both columns
    child.expect("you>")
    child.sendline("/reset")
    child.expect("history cleared")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_browser_check_sees_console_errors_and_reports_have_none(chromium, capsys, tmp_path, model_dirs):
    """The check can fail (a page with a script error), and a real report passes it."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    messages = chromium(bad, tmp_path / "bad.png", height=300)
    assert any("boom" in m for m in messages) and any("missing" in m for m in messages)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST)
    assert code == 0, err
    assert chromium(out / "report.html", tmp_path / "report.png") == []
