// abliterate's chat page: the exported model (and the original, when both were given) answers the typed
// prompt, greedy and token by token, with the chat template applied, all in this tab with Transformers.js;
// with a direction, the activation grid of the prompt's last token at the exported hidden layer.
// Everything is loaded from this folder (runtime/, models/, page.json, direction.json): no CDN, no hub.
// The page records what it did in window.abliterate (read by tests/test_web.py).

import { AutoModelForCausalLM, AutoTokenizer, TextStreamer, env } from "./runtime/transformers.min.js";

const here = new URL(".", location.href);
const state = { status: "loading", results: {}, grid: null, error: null };
window.abliterate = state;
const $ = (id) => document.getElementById(id);

function fail(err) {
  state.status = "error";
  state.error = String(err && err.stack || err);
  $("status").textContent = `error: ${err && err.message || err}`;
  $("status").className = "error";
  console.error(err);
}

// Offline: local files only, no browser cache (a rebuilt page shows its new model), the runtime's own wasm.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = new URL("models/", here).pathname;
env.useBrowserCache = false;
env.useWasmCache = false;
const wasm = env.backends.onnx.wasm;
wasm.wasmPaths = {
  mjs: new URL("runtime/ort-wasm-simd-threaded.asyncify.mjs", here).href,
  wasm: new URL("runtime/ort-wasm-simd-threaded.asyncify.wasm", here).href,
};
// threads need SharedArrayBuffer, which needs cross-origin isolation (abliterate web --serve sends its headers)
wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

async function load(page) {
  const direction = page.direction ? await (await fetch(page.direction)).json() : null;
  const models = [];
  for (const m of page.models) {
    $("status").textContent = `loading ${m.label} (${m.dtype})...`;
    const tokenizer = await AutoTokenizer.from_pretrained(m.id);
    const model = await AutoModelForCausalLM.from_pretrained(m.id, { dtype: m.dtype, device: "wasm" });
    models.push({ ...m, tokenizer, model, view: column(m, direction) });
  }
  return { models, direction };
}

function column(m, direction) {
  const div = document.createElement("div");
  div.className = "column";
  div.id = `column-${m.id}`;
  div.innerHTML = `<h2></h2><div class="answer"></div><div class="small speed"></div>`;
  div.querySelector("h2").textContent = `${m.id}: ${m.label} (${m.dtype})`;
  if (direction && m.hidden_layer !== null && m.hidden_layer !== undefined) {
    const grid = document.createElement("div");
    grid.className = "grid";
    grid.innerHTML = `<h3></h3><canvas></canvas><div class="small"></div>`;
    div.appendChild(grid);
  }
  $("columns").appendChild(div);
  return div;
}

function chatIds(tokenizer, prompt) {
  const text = tokenizer.chat_template || tokenizer.default_chat_template
    ? tokenizer.apply_chat_template([{ role: "user", content: prompt }], { tokenize: false, add_generation_prompt: true })
    : prompt;
  return tokenizer(text, { add_special_tokens: false });
}

async function answer(m, prompt, maxNewTokens) {
  const box = m.view.querySelector(".answer");
  box.textContent = "";
  const inputs = chatIds(m.tokenizer, prompt);
  const times = [];
  const streamer = new TextStreamer(m.tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: (text) => { box.textContent += text; },
    token_callback_function: () => { times.push(performance.now()); },
  });
  const start = performance.now();
  const out = await m.model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer });
  const n = inputs.input_ids.dims[1];
  const ids = Array.from(out.tolist()[0].slice(n), Number);
  const text = m.tokenizer.decode(ids, { skip_special_tokens: true });
  box.textContent = text;
  // decode speed: tokens after the first over the time since the first (the prompt's pass is not decoding)
  const decode = times.length > 1 ? (times.length - 1) / ((times.at(-1) - times[0]) / 1000) : null;
  const result = { ids, text, prompt_tokens: n, streamed: times.length, seconds: (performance.now() - start) / 1000,
    tokens_per_s: decode };
  m.view.querySelector(".speed").textContent =
    `${ids.length} tokens in ${result.seconds.toFixed(2)} s` + (decode ? `, ${decode.toFixed(1)} tokens/s` : "");
  return result;
}

// The residual stream entering block `hidden_layer` at the prompt's last token, h, against the unit direction
// d: one box per dimension, coloured by h_i * d_i (red adds to the projection, blue takes from it), and the
// projection h . d, the sum of the boxes.
async function grid(m, prompt, direction) {
  const inputs = chatIds(m.tokenizer, prompt);
  const out = await m.model(inputs);
  const hs = out.hidden_states; // (1, S, H)
  if (!hs) throw new Error(`${m.id}: the graph has no hidden_states output`);
  const [, S, H] = hs.dims;
  if (H !== direction.vector.length) throw new Error(`direction has ${direction.vector.length} dims, model ${H}`);
  const h = hs.data.subarray((S - 1) * H, S * H);
  const c = Array.from(h, (x, i) => x * direction.vector[i]);
  const projection = c.reduce((a, b) => a + b, 0);
  const top = Math.max(...c.map(Math.abs)) || 1;
  const cols = Math.ceil(Math.sqrt(H)), rows = Math.ceil(H / cols), px = Math.max(4, Math.floor(360 / cols));
  const canvas = m.view.querySelector("canvas");
  canvas.width = cols * px;
  canvas.height = rows * px;
  const g = canvas.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, canvas.width, canvas.height);
  c.forEach((v, i) => {
    const a = Math.min(1, Math.abs(v) / top);
    const other = Math.round(255 * (1 - a));
    g.fillStyle = v >= 0 ? `rgb(255,${other},${other})` : `rgb(${other},${other},255)`;
    g.fillRect((i % cols) * px, Math.floor(i / cols) * px, px - 1, px - 1);
  });
  m.view.querySelector(".grid h3").textContent =
    `layer ${m.hidden_layer}: projection on the direction ${projection.toFixed(3)}`;
  m.view.querySelector(".grid .small").textContent =
    `${H} boxes, one per residual dimension, coloured by h_i * d_i (red: towards the direction, blue: away; ` +
    `full colour = ${top.toFixed(3)}); direction of layer ${direction.direction_layer} (${direction.source})`;
  return { projection, hidden_layer: m.hidden_layer, dims: H, max_abs: top };
}

async function main() {
  const page = await (await fetch("page.json")).json();
  $("about").textContent = `Transformers.js ${page.runtime["@huggingface/transformers"]}, onnxruntime-web ` +
    `${page.runtime["onnxruntime-web"]}, ${wasm.numThreads} thread(s); greedy, at most ${page.max_new_tokens} tokens`;
  const { models, direction } = await load(page);
  const params = new URLSearchParams(location.search);
  const maxNewTokens = Number(params.get("max_new_tokens")) || page.max_new_tokens;
  let busy = false;
  async function send(prompt) {
    if (busy || !prompt.trim()) return;
    busy = true;
    $("send").disabled = true;
    state.status = "running";
    try {
      for (const m of models) {
        $("status").textContent = `${m.label}: answering...`;
        state.results[m.id] = await answer(m, prompt, maxNewTokens);
        if (direction && m.view.querySelector("canvas")) state.grid = { ...(state.grid || {}), [m.id]: await grid(m, prompt, direction) };
      }
      state.status = "done";
      $("status").textContent = "done";
    } catch (err) {
      fail(err);
    } finally {
      busy = false;
      $("send").disabled = false;
    }
  }
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); send($("prompt").value); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send($("prompt").value); }
  });
  state.status = "ready";
  $("status").textContent = "ready";
  $("send").disabled = false;
  if (params.get("prompt")) {
    $("prompt").value = params.get("prompt");
    if (params.get("autorun") === "1") await send(params.get("prompt"));
  }
}

main().catch(fail);
