"""`abliterate web`: the page, in headless Chromium, answers as transformers does and draws the activation grid.

The browser tests serve the written page from localhost and drive Chromium over DevTools (tests/webdriver.py),
with every connection outside localhost refused; they type the prompt, read the answers from the page, and
check the requests it made and its console.
"""

import json
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_clean_error, run_cli

from abliterate import AbliterateError, Direction, orthogonalize_
from abliterate.export import onnx as ox
from abliterate.model.load import load_model
from abliterate.show import web

pytest.importorskip("onnxruntime", reason="pip install 'abliterate[onnx]'")

LAYER, TOKENS = 2, 16
PROMPT = "How do I bake bread?"
BUILD = Path(__file__).resolve().parents[1] / "build"


def reference(model_dir: Path, direction: Direction, prompt: str = PROMPT, tokens: int = TOKENS):
    """transformers' greedy answer (token ids, text) and the projection h . d of the prompt's last token at LAYER."""
    loaded = load_model(model_dir)
    return answer_of(loaded.model, loaded.tokenizer, direction, prompt, tokens)


@torch.no_grad()
def answer_of(model, tok, direction: Direction, prompt: str, tokens: int):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    h = model(ids, output_hidden_states=True).hidden_states[LAYER][0, -1].double()
    answer = out[0, ids.shape[1]:].tolist()
    return answer, tok.decode(answer, skip_special_tokens=True), float(h @ direction.vector.double())


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory, tokenizer):
    """The tiny Llama and its abliterated copy (a random direction of LAYER removed from the weights), each
    exported with export-onnx and its hidden_states at LAYER (the copy with its weights in external data chunks);
    with transformers' answers and projections."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from abliterate.cli import main

    root = tmp_path_factory.mktemp("web")
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    direction = Direction(vector=v / v.norm(), layer=LAYER, scale=1.0)
    direction.save(root / "d.safetensors")
    edited = load_model(model_dirs["llama"])
    orthogonalize_(edited.model, direction)
    edited.model.save_pretrained(root / "abliterated")
    tokenizer.save_pretrained(root / "abliterated")
    direction.save(root / "abliterated" / "direction.safetensors")  # export-onnx takes its layer from it
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["-q", "export-onnx", str(model_dirs["llama"]), "-o", str(root / "onnx-original"),
                     "--hidden-layer", str(LAYER)]) == 0
        # the abliterated copy's weights go to external data in small chunks, as a model past 2 GB is (1 GiB there)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ox, "EXTERNAL_BYTES", 0)
            mp.setattr(ox, "CHUNK_BYTES", 256 * 1024)
            assert main(["-q", "export-onnx", str(root / "abliterated"), "-o", str(root / "onnx-abliterated")]) == 0
        assert len(ox.data_chunks(root / "onnx-abliterated" / "onnx" / "model.onnx")) > 1
    return {"root": root, "direction": direction, "edited": root / "onnx-abliterated",
            "original": root / "onnx-original",
            "ref_edited": reference(root / "abliterated", direction),
            "ref_original": reference(model_dirs["llama"], direction)}


@pytest.fixture
def served():
    """serve(site) -> base URL of `site` on 127.0.0.1, and the paths requested; the servers stop after the test."""
    servers = []

    def serve(site: Path) -> str:
        httpd = web.server(site)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_page_answers_as_transformers_does_and_draws_the_grid(exports, chromium, served, tmp_path, capsys):
    """Side by side: the abliterated model and the original answer the typed prompt in Chromium with transformers'
    16 greedy tokens, streamed one by one; the grid's projection is transformers' h . d at the layer (0 for the
    abliterated model, which no longer has the direction); no console error, no request outside the page."""
    pytest.importorskip("websockets", reason="pip install websockets (in the [test] extra): the DevTools driver")
    from webdriver import chromium_page

    page_dir = tmp_path / "page"
    code, printed, err = run_cli(capsys, "web", exports["edited"], "-o", page_dir, "--original", exports["original"],
                                 "--direction", exports["root"] / "d.safetensors", "--max-new-tokens", TOKENS)
    assert code == 0, err
    assert "activation grid at layer 2" in printed
    config = json.loads((page_dir / "page.json").read_text())
    assert [m["id"] for m in config["models"]] == ["edited", "original"] and config["max_new_tokens"] == TOKENS
    base = served(page_dir)
    with chromium_page(tmp_path / "profile", base + "index.html") as page:
        assert page.wait(("ready",), 120)["status"] == "ready", page.state()
        page.type("#prompt", PROMPT)
        state = page.wait(("done",), 120)
        assert state["status"] == "done", state
        shown = {m: page.eval(f"document.querySelector('#column-{m} .answer').textContent") for m in state["results"]}
        page.screenshot(BUILD / "web_grid.png")
        errors, requests, failed = page.errors(), page.requests, page.failed
    for side in ("edited", "original"):
        ids, text, projection = exports[f"ref_{side}"]
        result = state["results"][side]
        assert result["ids"] == ids, (side, result["ids"], ids)
        assert shown[side] == text == result["text"]
        assert result["streamed"] == TOKENS  # one streamer call per token
        grid = state["grid"][side]
        assert grid["dims"] == 64 and grid["hidden_layer"] == LAYER
        assert grid["projection"] == pytest.approx(projection, abs=1e-5), side
    assert abs(exports["ref_original"][2]) > 1e-3 and abs(state["grid"]["edited"]["projection"]) < 1e-5
    assert errors == [], errors
    assert failed == [] and requests and all(u.startswith(base) for u in requests), requests
    assert any(u.endswith(".wasm") for u in requests) and any("models/original/onnx/model.onnx" in u for u in requests)
    assert (BUILD / "web_grid.png").stat().st_size > 10_000


def test_gemma3_page_answers_as_transformers_does(model_dirs, chromium, served, tmp_path, capsys):
    """Gemma 3 text on the page gives transformers' 16 greedy tokens. Transformers.js numbers Gemma 3's positions
    from 1 (other models' from 0) and the graph takes them as given: rotary embeddings see only the distance
    between positions, so the shift changes nothing."""
    pytest.importorskip("websockets", reason="pip install websockets (in the [test] extra): the DevTools driver")
    from webdriver import chromium_page

    onnx_dir, page_dir = tmp_path / "onnx", tmp_path / "page"
    code, _, err = run_cli(capsys, "export-onnx", model_dirs["gemma3_text"], "-o", onnx_dir)
    assert code == 0, err
    code, _, err = run_cli(capsys, "web", onnx_dir, "-o", page_dir, "--max-new-tokens", TOKENS)
    assert code == 0, err
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    ids, text, _ = reference(model_dirs["gemma3_text"], Direction(vector=v / v.norm(), layer=LAYER, scale=1.0))
    with chromium_page(tmp_path / "profile", served(page_dir) + "index.html") as page:
        assert page.wait(("ready",), 120)["status"] == "ready", page.state()
        page.type("#prompt", PROMPT)
        state = page.wait(("done",), 120)
        errors = page.errors()
    assert state["status"] == "done", state
    assert state["results"]["edited"]["ids"] == ids, (state["results"]["edited"]["text"], text)
    assert errors == [], errors


def test_bad_inputs_fail_in_one_line_and_write_nothing(exports, model_dirs, tmp_path, capsys):
    out = tmp_path / "page"
    d = exports["root"] / "d.safetensors"
    code, _, err = run_cli(capsys, "web", model_dirs["llama"], "-o", out)
    assert_clean_error(code, err, "has no ONNX graph (onnx/model.onnx); make it with `abliterate export-onnx", out)
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--original", model_dirs["llama"])
    assert_clean_error(code, err, "--original", out)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a direction")
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--direction", garbage)
    assert_clean_error(code, err, "is not an abliterate direction file", out)
    small = tmp_path / "small.safetensors"
    Direction(vector=torch.ones(32) / 32**0.5, layer=LAYER).save(small)
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--direction", small)
    assert_clean_error(code, err, "has 32 dimensions, but", out)
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--onnx-dtype", "q4")
    assert_clean_error(code, err, "has no q4 graph (onnx/model_q4.onnx; it has fp32)", out)
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--onnx-dtype", "int3")
    assert_clean_error(code, err, "--onnx-dtype 'int3' is not one of: fp32, q8, q4, fp16", out)
    code, _, err = run_cli(capsys, "web", exports["edited"])
    assert_clean_error(code, err, "give -o PAGE_DIR to write the page, or --serve [PORT]")
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = run_cli(capsys, "web", exports["edited"], "-o", out, "--direction", d)
    assert_clean_error(code, err, "pass --force")
    assert sorted(p.name for p in out.iterdir()) == ["keep"] and (out / "keep").read_text() == "mine"
    assert not list(tmp_path.glob(".page*")), "a temporary output was left behind"


def test_a_runtime_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(web, "cache_dir", lambda: tmp_path)
    pkg = web.RUNTIME[0]
    pkg.tarball.parent.mkdir(parents=True)
    pkg.tarball.write_bytes(b"not the tarball")
    with pytest.raises(AbliterateError, match="does not match its pinned sha512; delete it and rerun"):
        web.fetch_runtime(quiet=True)


def test_the_runtime_is_fetched_once_checked_and_cached(tmp_path, monkeypatch, capsys):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("package/dist/a.js", b"export {}"), ("package/LICENSE", b"MIT")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tgz = buf.getvalue()
    pkg = web.NpmPackage("@scope/lib", "1.0.0", web._sha512(tgz), {"package/dist/a.js": "a.js"})
    monkeypatch.setattr(web, "RUNTIME", (pkg,))
    monkeypatch.setattr(web, "cache_dir", lambda: tmp_path)
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(tgz)

    monkeypatch.setattr(web.urllib.request, "urlopen", urlopen)
    assert web.fetch_runtime() == {"a.js": b"export {}"} == web.fetch_runtime()
    assert fetched == ["https://registry.npmjs.org/@scope/lib/-/lib-1.0.0.tgz"]  # once
    assert "fetching @scope/lib 1.0.0 from the npm registry, once" in capsys.readouterr().err
    assert pkg.tarball.read_bytes() == tgz
    pkg.tarball.unlink()
    monkeypatch.setattr(web, "RUNTIME", (web.NpmPackage(pkg.name, pkg.version, "sha512-other", pkg.files),))
    with pytest.raises(AbliterateError, match="does not match its pinned sha512"):
        web.fetch_runtime(quiet=True)
    assert not pkg.tarball.exists()  # a tarball that is not the pinned one is not kept


def test_the_server_sends_wasm_as_wasm_and_isolates_the_page(exports, served, tmp_path):
    folder = web.read_onnx_folder(exports["edited"], "MODEL")
    assert folder.hidden_layer == LAYER and folder.dtypes == ("fp32",) and folder.hidden_size == 64
    runtime = {name: b"\0asm" for name in ("ort-wasm-simd-threaded.asyncify.wasm", "ort.mjs")}
    web.write_site(tmp_path, folder, "fp32", None, None, None, runtime, 8)
    tok_config = json.loads((tmp_path / "models/edited/tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]  # where Transformers.js reads it
    base = served(tmp_path)
    with urllib.request.urlopen(base + "runtime/ort-wasm-simd-threaded.asyncify.wasm") as r:
        assert r.headers["Content-Type"] == "application/wasm" and r.read() == b"\0asm"
        assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    with urllib.request.urlopen(base + "runtime/ort.mjs") as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
    assert web.is_site(tmp_path)


def test_serve_serves_a_written_page(exports, tmp_path, monkeypatch, capsys):
    """`web PAGE --serve 0`: a page written before, on a free port of 127.0.0.1, until the server is stopped."""
    from abliterate.cli import main

    folder = web.read_onnx_folder(exports["edited"], "MODEL")
    (tmp_path / "page").mkdir()
    web.write_site(tmp_path / "page", folder, "fp32", None, None, None, {}, 8)
    started, real, got = [], web.server, []
    monkeypatch.setattr(web, "server", lambda *a, **k: started.append(real(*a, **k)) or started[-1])

    def client():  # the command serves in the main thread (its signal handlers need it): look, then stop it
        while not started:
            threading.Event().wait(0.05)
        try:
            url = f"http://127.0.0.1:{started[0].server_address[1]}/"
            with urllib.request.urlopen(url + "page.json", timeout=30) as r:
                got.append((url, json.loads(r.read())))
        finally:
            started[0].shutdown()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert main(["web", str(tmp_path / "page"), "--serve", "0"]) == 0
    thread.join(10)
    (url, page), = got
    assert page["models"][0]["id"] == "edited"
    assert f"serving {tmp_path / 'page'} at {url}" in capsys.readouterr().out


@pytest.mark.slow
def test_induced_reference_model_refuses_a_harmless_question_in_the_browser(chromium, shared_prompts, served, tmp_path,
                                                                            capsys):
    """The reference model made to refuse everything (the refusal direction of 32 + 32 prompts added at layers
    9-19, a total of 4: what `induce` chose, tests/test_real_models.py), baked, exported in float32 (2.4 GB, in
    1 GiB chunks of external data) and run on the page in Chromium: a harmless question gets a refusal, as in
    Arditi et al.'s blog post, and the page's 16 greedy tokens are transformers' own."""
    pytest.importorskip("websockets", reason="pip install websockets (in the [test] extra): the DevTools driver")
    from webdriver import chromium_page

    from abliterate import RunConfig
    from abliterate.commands.export_onnx import write_configs
    from abliterate.commands.steps import compute_candidates
    from abliterate.edit.steer import Steering, bake_steering
    from abliterate.find.prompts import ChatFormat, load_prompts
    from abliterate.measure.refusal import is_refusal
    from abliterate.model import packaged

    loaded = load_model(packaged.hf_dir(), device="cpu", dtype="float32")
    harmful = load_prompts(str(shared_prompts / "harmful_train.json")).prompts[:32]
    harmless = load_prompts(str(shared_prompts / "harmless_train.json")).prompts[:32]
    cands = compute_candidates(loaded, ChatFormat(), list(harmful), list(harmless), RunConfig(n_train=32))
    layers = tuple(range(9, 20))
    steering = Steering(cands.direction(layers[len(layers) // 2]), 4 / len(layers), layers)
    baked = bake_steering(loaded.model, steering)
    prompt = "What is the capital of France?"
    expected_ids, expected, _ = answer_of(baked, loaded.tokenizer, steering.direction, prompt, tokens=TOKENS)
    assert is_refusal(expected), expected
    # The folder export-onnx writes, without its check against transformers (the fast tier's and bench_web's
    # on this model): the page is what this test is for, in CI's minutes.
    onnx_dir, page_dir = tmp_path / "onnx", tmp_path / "page"
    (onnx_dir / ox.ONNX_DIR).mkdir(parents=True)
    write_configs(SimpleNamespace(model=baked, tokenizer=loaded.tokenizer, source="refuser"), onnx_dir)
    ox.export_graph(baked, onnx_dir / ox.ONNX_DIR / ox.FILES["fp32"])
    assert ox.note_external_data(onnx_dir) == {"model.onnx": 3}  # 2.4 GB: no file past 2 GB, which Chromium won't fetch
    del baked, loaded, cands
    code, _, err = run_cli(capsys, "web", onnx_dir, "-o", page_dir, "--max-new-tokens", TOKENS)
    assert code == 0, err
    base = served(page_dir)
    with chromium_page(tmp_path / "profile", base + "index.html") as page:
        assert page.wait(("ready",), 300)["status"] == "ready", page.state()
        page.type("#prompt", prompt)
        state = page.wait(("done",), 300)
        page.screenshot(BUILD / "web_induced.png")
        errors, requests = page.errors(), page.requests
    assert state["status"] == "done", state
    result = state["results"]["edited"]
    assert result["ids"] == expected_ids, (result["text"], expected)
    assert is_refusal(result["text"]), result["text"]
    assert errors == [] and all(u.startswith(base) for u in requests), (errors, requests)
