"""Tiny random models of every supported architecture, with a real (small) tokenizer and chat template.

They are saved to disk as safetensors directories, so the tests go through the
same loading path as users' models. Building all of them takes a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from abliterate.cli import main  # noqa: E402  after the environment: the hub stays offline

QUICK_SUBJECT = "high_school_geography"  # the fast tier's quick check: this subject's two packaged items


@pytest.fixture(autouse=True)
def small_quick_check(request, monkeypatch):
    """`run` checks capability by default on the packaged quick sample (114 MMLU items, 5-shot): on the tiny
    models' 512-token vocabulary its prompts are ~1,200 tokens per subject, about 50 s a run. The fast tier runs
    that default path on the sample's items of one subject; tests that ask for `full_quick_sample`, and the
    slow tier, get the whole sample."""
    if "full_quick_sample" in request.fixturenames or request.node.get_closest_marker("slow"):
        return
    from abliterate.measure import capability

    items, dev = capability.quick_items()
    small = ([it for it in items if it.subject == QUICK_SUBJECT], [d for d in dev if d.subject == QUICK_SUBJECT])
    monkeypatch.setattr(capability, "quick_items", lambda: small)


@pytest.fixture
def full_quick_sample():
    """The packaged quick-check sample as shipped (see small_quick_check)."""


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

H, LAYERS, HEADS = 64, 5, 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from abliterate.find.prompts import load_prompts

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(load_prompts("builtin:harmful").prompts + load_prompts("builtin:harmless").prompts)
    tok.train_from_iterator(corpus * 2, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    return fast


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=2, pad_token_id=0, bos_token_id=None)


def make_config(arch: str, vocab: int):
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    c = _common(vocab)
    if arch == "llama":
        return LlamaConfig(**c, tie_word_embeddings=False)
    if arch == "llama_tied":
        return LlamaConfig(**c, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**c, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**c, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**c, head_dim=16)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**c, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              decoder_sparse_step=1, mlp_only_layers=[1], head_dim=16)
    if arch == "phi3":
        return Phi3Config(**c)
    if arch == "gemma2":
        return Gemma2Config(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    if arch == "gemma3":
        text = Gemma3TextConfig(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        return Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                            image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                          eos_token_id=2, pad_token_id=0, bos_token_id=None)
    raise ValueError(arch)


ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", "gemma3",
         "gpt2"]
GEMMA = {"gemma2", "gemma3_text", "gemma3"}


def make_model(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = make_config(arch, len(tokenizer))
    cls = Gemma3ForConditionalGeneration if arch == "gemma3" else AutoModelForCausalLM
    model = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)
    with torch.no_grad():  # norms at 1 + noise, so Gemma's post-norm scale is not trivially uniform
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Every tiny architecture saved as a Hugging Face directory, built once per session."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHS:
        path = root / arch
        make_model(arch, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def shared_prompts() -> Path:
    """The project's shared test prompts (../shared/data/prompts from the repo root)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"
    if not path.is_dir():
        pytest.skip(f"shared prompt data not found at {path}")
    return path


# ---------------------------------------------------------------- helpers shared by test modules

def gguf_fields(reader):
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def assert_edited_copy(source, out, summary_edited: dict, added=()):
    """Metadata identical; unedited tensors byte-identical; edited ones in their original types."""
    a, b = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    assert gguf_fields(a) == gguf_fields(b)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) == set(ta) | set(added)
    for name, t in ta.items():
        assert tb[name].tensor_type == t.tensor_type, name
        assert list(tb[name].shape) == list(t.shape), name
        same = np.array_equal(np.asarray(tb[name].data), np.asarray(t.data))
        assert same != (name in summary_edited), name  # edited tensors differ, the rest are identical
    for name in added:  # a tied head keeps the original embedding
        assert np.array_equal(np.asarray(tb[name].data), np.asarray(ta["token_embd.weight"].data))


FAST = ["--n-train", "8", "--n-select", "4", "--n-eval-harmful", "4", "--n-eval-harmless", "4",
        "--max-new-tokens", "4", "--kl-tokens", "3"]


def run_cli(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, match, *must_not_exist):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("abliterate: error:")]
    assert len(lines) == 1 and match in lines[0], err
    for path in must_not_exist:
        assert not path.exists(), f"{path} was written"


def random_ablation(layout, k=2, norm="none", embed=0.7, seed=0):
    """A weighted ablation with every kind of weight: k-dimensional bases, 0, below and above 1, an embedding's."""
    from abliterate.edit.weighted import Ablation

    g = torch.Generator().manual_seed(seed)
    L, H = layout.n_layers, layout.hidden_size
    bases = torch.linalg.qr(torch.randn(L, H, k, generator=g)).Q.transpose(1, 2).contiguous()  # (L, k, H)
    attn = torch.tensor([1.3, 0.0, 0.6, 1.0] * L)[:L]
    mlp = torch.tensor([0.5, 1.0, 1.5, 0.0] * L)[:L]
    return Ablation(bases, attn, mlp, bases[0].clone(), embed, norm)


def inputs(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in ("How do I bake bread?", "Tell me about the history of Rome and its emperors.")]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python, or a skip that says how to get it (tests using this fixture are marked `llama`)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                               "'abliterate[llama]'; `make test` builds it)")


def pytest_collection_modifyitems(items):
    """Markers from what a test uses: `browser` (the chromium fixture), `llama` (the llama_cpp fixture)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "chromium" in names:
            item.add_marker(pytest.mark.browser)
        if "llama_cpp" in names:
            item.add_marker(pytest.mark.llama)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """render(html_path, png_path, height) -> console messages, from headless Chromium (Debian's `chromium`)."""
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not found: `apt-get install chromium` (make test installs it when root)")

    def render(page: Path, png: Path, height: int = 2400) -> list[str]:
        profile = tmp_path_factory.mktemp("chromium-profile")
        proc = subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
             f"--window-size=1280,{height}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert png.is_file() and png.stat().st_size > 0, proc.stderr[-2000:]
        return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]

    return render


SHARD = "40KB"  # the tiny models (about 1 MB) in 10 to 30 shards (the streamed tests)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """arch -> (in-memory model, its directory saved in SHARD-sized shards), for the streamed tests."""
    root = tmp_path_factory.mktemp("sharded")
    cache = {}

    def get(arch):
        if arch not in cache:
            model = make_model(arch, tokenizer)
            model.save_pretrained(root / arch, max_shard_size=SHARD)
            tokenizer.save_pretrained(root / arch)
            assert len(list((root / arch).glob("model-*.safetensors"))) >= 3
            cache[arch] = model, root / arch
        return cache[arch]
    return get


def cloze_task(items, folder: Path, name: str = "cloze_mc") -> Path:
    """lm-eval's `mmlu_continuation` as a local task file over `items` (capability.Item), zero-shot: the same
    description, question text, choices and metrics (acc, acc_norm), reading the items from a JSON-lines file
    (hub datasets are unreachable offline). Writes `name`.jsonl and `name`.yaml in `folder`."""
    import json

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"subject": it.subject, "question": it.question, "choices": list(it.choices),
                                        "answer": it.answer}) + "\n" for it in items))
    task = folder / f"{name}.yaml"
    task.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are questions (with answers) about {{{{subject|replace('_', ' ')}}}}.\\n\\n"
doc_to_text: "Question: {{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return task


def hide_module(monkeypatch, name: str) -> None:
    """Make `import name` (and its submodules) fail as if the package were not installed."""
    import builtins

    real = builtins.__import__

    def fake(module, *args, **kwargs):
        if module == name or module.startswith(f"{name}."):
            raise ImportError(f"No module named {name!r}")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
