"""Every option of every command, with its default and its help text, in one place.

`RunConfig` holds what the pipeline's stages use (prompts, selection, search, evaluation,
the machine, the output format); the CLI takes a subset of its fields per command. Each
command family has its own dataclass below for the options only it has (its inputs and
output paths). `commands/options.py` builds every argparse option and its `--help` from
these fields, so a default is written once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import AbliterateError
from .export.gguf_copy import check_gguf_types
from .export.hf import check_size
from .model.load import check_device, check_dtype
from .model.mapped import check_device_map
from .measure.judge import CALIBRATIONS
from .model.streamed import parse_memory
from .search.space import OPTIONS, parse_options


def opt(default, help: str, *, flags: tuple[str, ...] = (), positional: bool = False, required: bool = False,
        many: bool = False, output: str | None = None, const=None):
    """A field with its help text. flags: the option strings (default --field-name); many: repeatable;
    output: the option names a path the command writes, a "file" or a "model" (a directory, or NAME.gguf),
    checked before any model loads (commands.options.check_outputs); const: the value of the option given
    without one (`--serve` alone: `--serve [PORT]`)."""
    return field(default=default, metadata={"help": help, "flags": flags, "positional": positional,
                                            "required": required, "many": many, "output": output, "const": const})


MODEL_HELP = "hub id, model directory or .gguf file"


@dataclass
class RunConfig:
    # prompts
    harmful: str = opt("builtin:harmful:train", "prompts that the model refuses: builtin:harmful[:train|test], "
                       "a .txt/.json/.jsonl/.csv file, or hf:DATASET")
    harmless: str = opt("builtin:harmless:train", "prompts that the model answers (same forms as --harmful)")
    column: str | None = opt(None, "field or CSV column that holds the prompt (default: instruction/prompt/text)")
    n_train: int = opt(128, "prompts of each set used to compute the directions (Arditi et al. used 128)")
    n_select: int = opt(16, "held-out prompts of each set used to score candidate directions")
    eval_harmful: str = opt("builtin:harmful:test", "held-out harmful prompts for the refusal rate")
    eval_harmless: str = opt("builtin:harmless:test", "held-out harmless prompts for over-refusal and KL")
    n_eval_harmful: int | None = opt(None, "use at most this many evaluation harmful prompts (default: all)")
    n_eval_harmless: int | None = opt(100, "use at most this many evaluation harmless prompts")
    system_prompt: str | None = opt(None, "system prompt added to every chat (default: the template's own)")
    plain_prompts: bool = opt(False, "feed prompts as plain text, for models without a chat template")
    # directions and selection
    positions: str = opt("last", "candidate positions: 'last' (last prompt token) or 'all' "
                         "(every post-instruction template token; slower selection)")
    projected: bool = opt(False, "remove the harmless mean's component from each direction (biprojection)")
    layer: int | None = opt(None, "use this layer's direction instead of selecting one")
    min_layer_frac: float = opt(0.2, "skip candidate layers below this fraction of depth")
    max_layer_frac: float = opt(0.8, "skip candidate layers at or above this fraction of depth (Arditi: 0.8)")
    select_kl_max: float = opt(0.1, "candidates with a larger first-token KL on harmless prompts are rejected")
    # big models: every step one decoder block at a time (docs/big-models.md)
    stream: bool = opt(False, "find the direction one decoder block at a time, each read from the safetensors "
                       "shards and freed, never loading the model whole (a local model directory); run also "
                       "evaluates that way and bakes shard by shard")
    max_memory: str | None = opt(None, "memory budget for the streamed weights, activations and key/value caches, "
                                 "e.g. 512MB or 8GB: "
                                 "a model whose weights do not fit streams as with --stream, in as many passes "
                                 "as the budget needs")
    # search (run --search): the edit is searched instead of plain abliteration
    search: bool = opt(False, "search the edit (direction, per-layer weights, norm preservation, subspace) for "
                       "the fewest refusals at the lowest KL, instead of removing one direction everywhere")
    trials: int = opt(60, "search: trials to complete (a resumed study counts the ones it has)")
    time_budget: float | None = opt(None, "search: start no trial after this many seconds of searching")
    search_options: str = opt("default", "search: what the search may vary: 'default', 'none', a comma list, "
                              "or +name/-name against the defaults (write --search-options=-row); names: "
                              + ", ".join(OPTIONS))
    n_search: int = opt(48, "search: held-out prompts of each set that score the trials")
    search_on: str = opt("held-out", "search: prompts that score the trials: 'held-out' (--n-search prompts of "
                         "--harmful/--harmless kept out of the directions) or 'eval' (the evaluation prompts "
                         "themselves, as Heretic does: the evaluation's figures are then in-sample)")
    finalists: int = opt(3, "search: Pareto points re-checked by full generation")
    slack: int = opt(1, "search: choose the lowest KL among finalists whose refusals are within this many of the best")
    max_kl: float | None = opt(None, "search: finalists above this first-token KL are not chosen")
    pick: str = opt("auto", "search: the front point kept: 'rule' (--slack, --max-kl), 'ask' (show the front and "
                    "read a trial number), 'auto' (ask on a terminal, else the rule), or a trial number")
    study: str | None = opt(None, "search: journal file of the study, resumed when it exists "
                            "(default: OUTPUT.study next to -o; in memory without -o)")
    # evaluation
    max_new_tokens: int = opt(32, "tokens generated per harmful evaluation prompt")
    kl_tokens: int = opt(16, "tokens of the original's answer over which KL is averaged (and harmless answers' length)")
    allow_overlap: bool = opt(False, "go on when evaluation prompts are also prompts the edit was fitted or selected "
                              "on (refused by default: such figures are not held out); the overlap is flagged in "
                              "the output and recorded")
    capability: str = opt("quick", "multiple-choice items that the original and the edited model both answer: "
                          "'quick' (a stratified sample of 114 MMLU questions shipped with the package: catches "
                          "a broken edit), a JSON or JSONL file of question, choices, answer (FILE:N for a "
                          "stratified sample of N), or 'none' (off): accuracy of each, retention, items lost "
                          "and gained, McNemar's p, per MMLU subject group (eval: with --original or --direction)")
    capability_dev: str | None = opt(None, "exemplars for few-shot prompts, by subject (e.g. MMLU's dev split); "
                                     "without it the items are asked zero-shot (quick with --capability-protocol "
                                     "letter has its own)")
    capability_shots: int = opt(5, "exemplars per question when there are exemplars")
    capability_protocol: str = opt("cloze", "how a choice is scored: 'cloze' (the likeliest choice text per "
                                   "character, lm-eval's mmlu_continuation acc_norm: what small models can do) or "
                                   "'letter' (the likeliest of ' A', ' B', ... after 'Answer:', lm-eval's mmlu: "
                                   "chance on the 0.5B reference model, docs/measure.md)")
    tasks: str | None = opt(None, "lm-eval tasks run on the original and the edited model (needs the [lmeval] "
                            "extra): registered names or task YAML files, comma-separated (e.g. "
                            "mmlu,gsm8k or ./task.yaml); each metric with lm-eval's stderr")
    tasks_limit: int | None = opt(None, "lm-eval: at most this many documents per task (lm-eval's --limit)")
    long_tokens: int = opt(0, "also answer --n-long prompts of each evaluation set at this many tokens, with the "
                           "original and the edited model (0, the default: off, as it adds two long generations "
                           "to a run; 128 or more to see past the start): loops, degenerate answers, length "
                           "against the original's, and refusals that appear only after the first "
                           "--max-new-tokens tokens")
    n_long: int = opt(16, "prompts answered at --long-tokens: the first N of the harmful and the first N of the "
                      "harmless evaluation prompts (all of a set that has fewer)")
    judge: str | None = opt(None, "also classify each answer to a harmful prompt as refused, evaded or complied with "
                            "this causal LM (hub id, model directory or .gguf), read from its next-token "
                            "probabilities under a short rubric: counts per model, agreement with the marker "
                            "detector and the answers they disagree on (default: the markers alone)")
    judge_calibration: str = opt("content-free", "how the judge's label probabilities are read: 'content-free' "
                                 "(divided by those it gives an empty item, 'Request: N/A, Answer: N/A': removes "
                                 "its lean towards one label, contextual calibration) or 'none' (as they are)")
    # model and machine
    batch_size: int = opt(32, "prompts per forward pass")
    device: str | None = opt(None, "cuda, mps or cpu (default: the best available)")
    dtype: str = opt("auto", "float32, bfloat16 or float16 (default: float32 on CPU, bf16/fp16 on GPU)")
    device_map: str | None = opt(None, "spread the model over the GPUs, the CPU and the disk with accelerate: auto, "
                                 "balanced, balanced_low_0 or sequential (a model directory or hub id); run then "
                                 "edits by hooks and bakes shard by shard from the source directory")
    device_memory: str | None = opt(None, "with --device-map: the budget of each device, accelerate's max_memory, "
                                    "e.g. 0=20GB,1=20GB,cpu=64GB (default: what each device has free)")
    allow_pickle: bool = opt(False, "allow loading pickle (.bin) weights, which can run code")
    trust_remote_code: bool = opt(False, "allow the model's own Python code from the hub")
    arch_spec: str | None = opt(None, "JSON file describing the residual writers of an unsupported architecture")
    seed: int = opt(0, "seed for prompt sampling")
    # output
    shard_size: str = opt("2GB", "largest safetensors shard")
    force: bool = opt(False, "replace existing outputs (a non-empty output directory, an existing file)")
    gguf_type: str = opt("F16", "GGUF output of a Hugging Face model: type of the weight matrices (F32, F16, BF16, "
                         "Q8_0, Q4_0, ...; K-quants with llama-cpp-python); norms and biases stay F32")
    gguf_fallback_type: str | None = opt(None, "GGUF output: type for edited tensors whose original type cannot be "
                                         "written here (e.g. Q8_0); default: stop with an error")

    def check(self) -> "RunConfig":
        """Raise on values no run can use, before any model is loaded."""
        examples = {"time_budget": "600 (seconds)", "max_kl": "0.1"}  # for options whose default is None
        for f in fields(self):  # nan passes every comparison below (and made selection run forever)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise AbliterateError(f"--{f.name.replace('_', '-')} {value} is not a finite number; give a number "
                                      f"such as {examples.get(f.name, f.default)}"
                                      + (", or leave the option out" if f.default is None else ""))
        check_device(self.device)
        check_dtype(self.dtype)
        check_device_map(self.device_map, self.device_memory, self.device)
        if self.device_map is not None and (self.stream or self.max_memory is not None):
            raise AbliterateError("--device-map and --stream/--max-memory are two ways to run a model bigger than "
                                  "memory: accelerate's offload, or abliterate's block-by-block stream; give one")
        if self.device_map is not None and self.search:
            raise AbliterateError("run --search does not run on a --device-map model (its trials bake in memory); "
                                  "leave out --device-map, or find a plain direction with --device-map")
        if self.tasks_limit is not None and self.tasks_limit < 1:
            raise AbliterateError(f"--tasks-limit must be at least 1, got {self.tasks_limit}; or leave it out")
        if self.judge_calibration not in CALIBRATIONS:
            raise AbliterateError(f"--judge-calibration {self.judge_calibration!r} is not one of: "
                                  f"{', '.join(CALIBRATIONS)}")
        if self.capability_protocol not in ("letter", "cloze"):
            raise AbliterateError(f"--capability-protocol {self.capability_protocol!r} is not one of: letter, cloze")
        if self.positions not in ("last", "all"):
            raise AbliterateError(f"--positions {self.positions!r} is not one of: last, all")
        for name in ("n_train", "n_select", "max_new_tokens", "kl_tokens", "batch_size", "trials", "n_search",
                     "finalists", "capability_shots"):
            if getattr(self, name) < 1:
                raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_layer_frac < self.max_layer_frac <= 1:
            raise AbliterateError(
                f"layer fractions must satisfy 0 <= min ({self.min_layer_frac}) < max ({self.max_layer_frac}) <= 1; "
                f"set --min-layer-frac and --max-layer-frac so that they do (defaults {type(self).min_layer_frac} and "
                f"{type(self).max_layer_frac})"
            )
        if self.long_tokens < 0 or self.n_long < 1:
            raise AbliterateError(f"--long-tokens must be at least 0 (0: off) and --n-long at least 1; got "
                                  f"--long-tokens {self.long_tokens}, --n-long {self.n_long}")
        if 0 < self.long_tokens <= self.max_new_tokens:
            raise AbliterateError(f"--long-tokens {self.long_tokens} must exceed --max-new-tokens "
                                  f"{self.max_new_tokens}, the answers refusals are counted in (a late refusal "
                                  f"comes after them); give 128 or more, or 0 for no long answers")
        for name in ("n_eval_harmful", "n_eval_harmless"):  # None: all of them
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)} "
                                      f"(leave it out to use every prompt of the set)")
        for name in ("select_kl_max", "max_kl"):  # a KL is never negative
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise AbliterateError(f"--{name.replace('_', '-')} must be at least 0 (a KL divergence is never "
                                      f"negative), got {getattr(self, name)}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise AbliterateError(f"--time-budget must be a positive number of seconds, got {self.time_budget} "
                                  f"(leave it out for no limit)")
        if self.slack < 0:
            raise AbliterateError(f"--slack must be at least 0, got {self.slack}")
        if self.pick not in ("auto", "rule", "ask") and not self.pick.isdigit():
            raise AbliterateError(f"--pick {self.pick!r} is not one of: auto, rule, ask, or a trial number")
        check_size(self.shard_size)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.search and self.stream:
            raise AbliterateError("run --search does not stream (its trials run the whole model); leave out --stream, "
                                  "or find a plain direction with --stream and no --search")
        check_gguf_types(self.gguf_type, self.gguf_fallback_type)
        if self.search_on not in ("held-out", "eval"):
            raise AbliterateError(f"--search-on {self.search_on!r} is not one of: held-out, eval")
        parse_options(self.search_options)
        return self

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


# ---------------------------------------------------------------- the options of each command family

@dataclass
class RunOptions:  # run, demo
    model: str = opt(None, MODEL_HELP, positional=True)
    output: str | None = opt(None, "output directory, or NAME.gguf (omit to evaluate without saving)",
                             flags=("-o", "--output"), output="model")
    report: str | None = opt(None, "also write report.html here (it is always saved inside -o)", output="file")


@dataclass
class DemoOptions:
    output: str | None = opt(None, "output directory (default: in the cache)", flags=("-o", "--output"),
                             output="model")
    report: str | None = opt(None, "also write report.html here (it is always saved inside -o)", output="file")


@dataclass
class DirectionsOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    output: str = opt(None, "direction file (.safetensors)", flags=("-o", "--output"), required=True, output="file")


@dataclass
class ConceptOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    positive: str = opt(None, "prompts showing the concept (same forms as --harmful)", required=True)
    negative: str = opt(None, "prompts without it", required=True)
    layer: int | None = opt(None, "layer of the direction (default: 40%% of depth)")
    output: str = opt(None, "direction file (.safetensors)", flags=("-o", "--output"), required=True, output="file")


@dataclass
class ApplyOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    direction: str | None = opt(None, "direction file from `abliterate directions` or a run")
    manifest: str | None = opt(None, "manifest.json (or NAME.manifest.json) of a run: its exact edit, searched "
                               "or not, from the files saved beside it")
    trial: int | None = opt(None, "with --manifest of a searched run: another finalist's edit (its trial number, "
                            "as in the run's front table) instead of the chosen one")
    output: str = opt(None, "model directory, NAME.gguf (a GGUF input is copied with only the edited tensors "
                      "replaced; a Hugging Face model is written whole, --gguf-type), or with --adapter an adapter "
                      "directory", flags=("-o", "--output"), required=True, output="model")
    adapter: bool = opt(False, "write the edit as a LoRA adapter (rank 1 per writer, exact) instead of a whole "
                        "model: a PEFT directory, or a llama.cpp LoRA when -o ends in .gguf")
    stream: bool = opt(False, "bake shard by shard without loading the model, for models bigger than memory: "
                       "each safetensors shard of MODEL (a local directory) is read, edited and written in turn, peak "
                       "memory about one shard plus one edited tensor; the same weights as without it, bit for bit "
                       "(same --dtype and --device), the input's shards (not --shard-size), and no forward-pass check "
                       "of the edit")


@dataclass
class ConvertOptions:
    model: str = opt(None, "Hugging Face model directory or hub id", positional=True)
    output: str = opt(None, "NAME.gguf", flags=("-o", "--output"), required=True, output="model")


@dataclass
class ExportOnnxOptions:
    model: str = opt(None, "Hugging Face model directory or hub id: an original, or a run, apply, steer or induce "
                     "output", positional=True)
    output: str = opt(None, "output directory: the folder Transformers.js loads (config, tokenizer, onnx/model.onnx)",
                      flags=("-o", "--output"), required=True, output="dir")
    quantize: list[str] | None = opt(None, "also write a smaller graph, checked against the original: q8 "
                                     "(onnx/model_quantized.onnx), q4 (onnx/model_q4.onnx) or fp16 "
                                     "(onnx/model_fp16.onnx); repeatable, or a comma list", many=True)
    hidden_layer: int | None = opt(None, "also output the residual stream entering this layer (hidden_states), for "
                                   "an activation grid (default: the direction's layer when MODEL is a run's or an "
                                   "apply's output, else none)")


@dataclass
class WebOptions:
    model: str = opt(None, "an export-onnx folder (the model the page runs), or a page folder `web` wrote (with "
                     "--serve)", positional=True)
    output: str | None = opt(None, "page directory to write: index.html, app.js, the runtime and the models",
                             flags=("-o", "--output"), output="dir")
    original: str | None = opt(None, "export-onnx folder of the original model, answering in a second column")
    direction: str | None = opt(None, "direction file (direction.safetensors) for the activation grid at MODEL's "
                                "hidden layer (export-onnx --hidden-layer)")
    onnx_dtype: str | None = opt(None, "graph the page loads, Transformers.js's dtype: fp32, q8, q4 or fp16 (default: "
                                 "fp32, else the one there)")
    max_new_tokens: int = opt(128, "most tokens the page generates per answer")
    serve: int | None = opt(None, "serve the page on 127.0.0.1:PORT (alone: 8000) until Ctrl-C; without -o, a "
                            "page of MODEL in a temporary folder", const=8000)


@dataclass
class EvalOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    direction: str | None = opt(None, "evaluate MODEL with this direction ablated by hooks, against MODEL")
    original: str | None = opt(None, "evaluate MODEL against this original model")
    json: str | None = opt(None, "also write the metrics to this JSON file", output="file")


@dataclass
class VerifyOptions:  # verify-gguf
    model: str = opt(None, "the GGUF file to evaluate", positional=True)
    original: str | None = opt(None, "the original GGUF, for before/after and KL")
    control_vector: str | None = opt(None, "apply this llama.cpp control vector to MODEL")
    control_scale: float = opt(1.0, "its scale")
    lora: str | None = opt(None, "apply this llama.cpp LoRA adapter (.gguf) to MODEL")
    json: str | None = opt(None, "write metrics and answers to this JSON file", output="file")


@dataclass
class SteerInputs:  # steer and sweep
    model: str = opt(None, MODEL_HELP, positional=True)
    direction: str = opt(None, "direction file (from `abliterate directions` or a run)", required=True)
    layers: str | None = opt(None, "layers whose input gets the vector: 10, 8,9,12 or 8-12 (default: the "
                             "direction's own layer)")
    prompt: list[str] | None = opt(None, "a prompt (repeatable); default: --prompts", many=True)
    prompts: str = opt("builtin:harmless:test", "prompt set")
    n: int = opt(16, "prompts to use from --prompts", flags=("-n",))
    marker: list[str] | None = opt(None, "measure a concept by these words instead of refusals (repeatable, "
                                   "case-insensitive)", many=True)


@dataclass
class SteerOptions(SteerInputs):
    strength: float = opt(None, "multiple of the direction's mean difference added at each layer (1: a harmless "
                          "prompt's mean moves onto a harmful one's; negative subtracts; 0 is the identity)",
                          required=True)
    show: int = opt(3, "answers to print side by side")
    output: str | None = opt(None, "bake the addition as a bias and save the model here", flags=("-o", "--output"),
                             output="model")
    control_vector: str | None = opt(None, "also write the addition as a llama.cpp control vector (.gguf)",
                                     output="file")
    report: str | None = opt(None, "also write report.html here (it is always saved inside -o)", output="file")


@dataclass
class SweepOptions(SteerInputs):
    strengths: str = opt("0,0.5,1,1.5,2,3", "comma-separated strengths; write --strengths=-1,0,1 when the first "
                         "is negative")
    plot: str | None = opt(None, "write the plot to this PNG", output="file")
    json: str | None = opt(None, "write the table to this JSON file", output="file")


@dataclass
class InduceOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    output: str | None = opt(None, "output directory (omit to measure without saving)", flags=("-o", "--output"),
                             output="model")
    layers: str | None = opt(None, "layer sets to search, separated by ';', e.g. '14;13-15;11-17' (default: 3, 7 "
                             "and 11 layers around 60%% of depth)")
    # On Qwen2.5-Coder-0.5B a total of 6 over eleven layers refused 90% of held-out harmless prompts
    # (search.induce.default_layer_sets); the range brackets it.
    strengths: str = opt("3,4,5,6,7", "total strengths to search, in mean differences, divided over a set's layers")
    # A refusal of a harmless request costs about 1.2 nats per token, word salad about 3 (measure.behaviour).
    max_drop: float = opt(1.5, "largest coherence loss allowed, nats per token below the original's answers")
    # Shorter than the evaluation's answers: a refusal shows in its first sentence, and the search runs
    # each setting on every held-out prompt.
    search_tokens: int = opt(24, "tokens per answer while searching (the evaluation uses --max-new-tokens)")
    report: str | None = opt(None, "also write report.html here (it is always saved inside -o)", output="file")


@dataclass
class InspectOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    direction: str | None = opt(None, "mark this direction's layer instead of running selection")
    plot: str = opt("inspect-layers.png", "PNG to write", output="file")
    json: str | None = opt(None, "also write the table to this JSON file", output="file")
    save_direction: str | None = opt(None, "save the chosen direction (with its candidates) to this file",
                                     output="file")


@dataclass
class TokensOptions:
    model: str = opt(None, MODEL_HELP, positional=True)
    direction: str = opt(None, "direction file (from `directions`, `inspect` or a run)", required=True)
    prompt: str = opt(None, "the text to look at (formatted with the chat template)", required=True)
    layer: int | None = opt(None, "layer to colour in the terminal and at the top of the HTML (default: the "
                            "direction's own; the heatmap and HTML show every layer)")
    html: str | None = opt(None, "write a self-contained HTML page here", output="file")
    heatmap: str | None = opt(None, "write the token-by-layer heatmap PNG here", output="file")


@dataclass
class ChatOptions:
    model: str = opt(None, "an abliterate output, or any model with --original or --direction", positional=True)
    original: str | None = opt(None, "the original model to compare with")
    direction: str | None = opt(None, "edit MODEL with hooks: ablate this direction (or add it, with --strength)")
    strength: float | None = opt(None, "add the direction with this strength instead of ablating it")
    layers: str | None = opt(None, "layers for --strength (default: the direction's own)")
    prompt: str | None = opt(None, "one message, answer both and exit (scriptable); default: interactive")
    # Longer than a run's evaluation answers (32 tokens): a conversation reads whole answers.
    max_new_tokens: int = opt(256, "tokens per answer")
    json: bool = opt(False, "with --prompt, print the two answers as JSON")
