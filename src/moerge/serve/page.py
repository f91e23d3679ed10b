"""The page at `/`: what is served (from /v1/models), a prompt box for any model, and for routed models
the answer with each token coloured by the expert that carried most weight (hover: all weights).

One self-contained HTML string, no external resources, so it works offline. `?model=M&prompt=P` fills
the form and sends it on load (a link to a question; the browser test uses it); `#key=K` fills the
API key (a fragment never reaches a server or its logs).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moerge serve</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}textarea{width:100%;height:5em}select,button,input{font-size:1em;margin:.3em .3em .3em 0}
#answer{white-space:pre-wrap;border:1px solid #ccc;padding:.8em;min-height:2em}
.tok{border-radius:3px;padding:0 1px}.legend span{padding:2px 6px;margin-right:6px;border-radius:3px}
.error{color:#b00}
</style></head>
<body>
<h1>moerge serve</h1>
<p><label>API key (if the server needs one) <input id="key" type="password"></label></p>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>kind</th><th>task</th><th>method</th></tr></thead>
<tbody></tbody></table>
<h2>Ask</h2>
<select id="model"></select>
<textarea id="prompt" placeholder="Your message"></textarea>
<button id="send">Send</button>
<p class="legend" id="legend"></p>
<div id="answer"></div>
<p id="routing"></p>
<script>
const COLOURS = ["#fbb4ae","#b3cde3","#ccebc5","#decbe4","#fed9a6","#ffffcc","#e5d8bd","#fddaec",
                 "#8dd3c7","#bebada","#fb8072","#80b1d3","#fdb462","#b3de69","#fccde5","#d9d9d9"];
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
function cell(row, text) { const td = document.createElement("td"); td.textContent = text ?? ""; row.appendChild(td); }
async function loadModels() {
  const reply = await fetch("/v1/models", {headers: headers()});
  const body = await reply.json();
  if (!reply.ok) { $("answer").textContent = body.error.message; $("answer").className = "error"; return []; }
  const rows = $("models").querySelector("tbody");
  rows.textContent = "";
  $("model").textContent = "";
  for (const m of body.data) {
    const row = document.createElement("tr");
    [m.id, m.kind, m.task, m.method].forEach((v) => cell(row, v));
    rows.appendChild(row);
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    $("model").appendChild(option);
  }
  return body.data;
}
function strongest(weights) {
  return Object.entries(weights).reduce((a, b) => (b[1] > a[1] ? b : a))[0];
}
async function send() {
  $("answer").className = "";
  $("answer").textContent = "…";
  const request = {model: $("model").value, max_tokens: 64, temperature: 0, moerge: {explain: true},
                   messages: [{role: "user", content: $("prompt").value}]};
  const options = {method: "POST", headers: headers(), body: JSON.stringify(request)};
  const reply = await fetch("/v1/chat/completions", options);
  const body = await reply.json();
  if (!reply.ok) { $("answer").textContent = body.error.message; $("answer").className = "error"; return; }
  const tokens = body.moerge && body.moerge.tokens ? body.moerge.tokens[0] : null;
  $("answer").textContent = "";
  $("legend").textContent = "";
  $("routing").textContent = "";
  if (!tokens) { $("answer").textContent = body.choices[0].message.content; return; }
  const experts = Object.keys(body.moerge.routing);
  experts.forEach((e, i) => {
    const span = document.createElement("span");
    span.textContent = e;
    span.style.background = COLOURS[i % COLOURS.length];
    $("legend").appendChild(span);
  });
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = t.text;
    const best = strongest(t.weights);
    span.dataset.expert = best;
    span.style.background = COLOURS[experts.indexOf(best) % COLOURS.length];
    span.title = Object.entries(t.weights).map(([e, w]) => e + ": " + w.toFixed(3)).join("\\n");
    $("answer").appendChild(span);
  }
  $("routing").textContent = "routing over the prompt: " +
    Object.entries(body.moerge.routing).map(([e, w]) => e + " " + w.toFixed(3)).join(", ");
}
$("send").addEventListener("click", send);
window.addEventListener("load", async () => {
  const fragment = new URLSearchParams(location.hash.slice(1));  // #key=...: never sent to a server
  if (fragment.get("key")) { $("key").value = fragment.get("key"); }
  await loadModels();
  const query = new URLSearchParams(location.search);
  if (query.get("model")) { $("model").value = query.get("model"); }
  if (query.get("prompt")) { $("prompt").value = query.get("prompt"); await send(); }
  document.body.dataset.ready = "yes";
});
</script>
</body></html>
"""
