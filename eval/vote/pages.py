"""The two HTML pages of the voting app (plain HTML + a little JavaScript, no build step)."""

VOTE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image comparison</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:12px;color:#222}
 #prompt{background:#f4f4f4;border-radius:6px;padding:10px 14px;line-height:1.45;max-height:9em;overflow:auto}
 .imgs{display:flex;gap:16px;margin:12px 0}.imgs figure{flex:1;margin:0;text-align:center}
 .imgs img{max-width:100%;max-height:60vh;border:1px solid #ccc;image-rendering:auto}
 figcaption{font-weight:bold;font-size:1.3em}
 .buttons{display:flex;gap:12px;justify-content:center}
 button{font-size:1.1em;padding:10px 26px;border-radius:6px;border:1px solid #888;background:#fff;cursor:pointer}
 button:hover{background:#eef}
 #question{font-size:1.25em;margin:10px 0;text-align:center}
 progress{width:100%;height:14px}.muted{color:#666;font-size:.9em}#error{color:#b00}
</style></head><body>
<div class="muted">Blind comparison: you do not know which model made which image. Sides are random.</div>
<progress id="bar" value="0" max="1"></progress><div id="progress" class="muted"></div>
<div id="task" hidden>
 <h3>Text</h3><div id="prompt"></div>
 <div id="question"></div>
 <div class="imgs"><figure><figcaption>A</figcaption><img id="imgA" alt="image A"></figure>
  <figure><figcaption>B</figcaption><img id="imgB" alt="image B"></figure></div>
 <div class="buttons"><button id="btnA" data-choice="A">A is better <span class="muted">[A / &larr;]</span></button>
  <button id="btnTie" data-choice="tie">Tie <span class="muted">[T / &darr;]</span></button>
  <button id="btnB" data-choice="B">B is better <span class="muted">[B / &rarr;]</span></button></div>
</div>
<div id="done" hidden><h2>All done. Thank you!</h2></div>
<div id="error"></div>
<script>
const token = new URLSearchParams(location.search).get("t") || "";
let task = null, busy = false;
const $ = (id) => document.getElementById(id);
function showProgress(p){ $("bar").max = Math.max(p.total,1); $("bar").value = p.done;
  $("progress").textContent = p.done + " / " + p.total + " answers"; }
async function api(path, body){
  const r = await fetch(path, {method: body ? "POST" : "GET", headers: {"X-Token": token, "Content-Type": "application/json"},
                               body: body ? JSON.stringify(body) : undefined});
  const data = await r.json().catch(() => ({}));
  if (!r.ok && r.status !== 409) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
async function load(){
  task = await api("/api/next"); showProgress(task.progress);
  if (task.done){ $("task").hidden = true; $("done").hidden = false; return; }
  $("prompt").textContent = task.prompt;
  $("imgA").src = "/image/" + task.pair_id + "/A?t=" + encodeURIComponent(token);
  $("imgB").src = "/image/" + task.pair_id + "/B?t=" + encodeURIComponent(token);
  $("question").textContent = task.questions[0].text; $("task").hidden = false;
}
function setBusy(b){ busy = b; document.body.dataset.state = b ? "busy" : (task && task.done ? "done" : "ready"); }
async function vote(choice){
  if (busy || !task || task.done) return; setBusy(true); $("error").textContent = "";
  try {
    const q = task.questions.shift();
    const res = await api("/api/vote", {pair_id: task.pair_id, question: q.id, choice: choice});
    showProgress(res.progress || task.progress);
    if (task.questions.length) $("question").textContent = task.questions[0].text; else await load();
  } catch (e) { $("error").textContent = e.message; } finally { setBusy(false); }
}
for (const b of document.querySelectorAll("button[data-choice]")) b.addEventListener("click", () => vote(b.dataset.choice));
document.addEventListener("keydown", (e) => {
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;  // a held key is one answer, shortcuts stay shortcuts
  const k = e.key.toLowerCase();
  if (k === "a" || k === "arrowleft") vote("A"); else if (k === "b" || k === "arrowright") vote("B");
  else if (k === "t" || k === "arrowdown") vote("tie");
});
setBusy(true);
load().catch((e) => { $("error").textContent = e.message; }).finally(() => setBusy(false));
</script></body></html>
"""

ADMIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Voting progress</title>
<style>body{font-family:system-ui,sans-serif;margin:20px}table{border-collapse:collapse;margin:10px 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f4f4f4}</style></head><body>
<h1>Voting progress</h1><div id="summary"></div>
<h2>Voters</h2><table id="voters"><thead><tr><th>voter</th><th>role</th><th>answers</th><th>of</th>
<th>pairs served</th><th>last answer (UTC)</th></tr></thead><tbody></tbody></table>
<h2>Comparisons</h2><table id="comparisons"><thead><tr><th>models</th><th>pairs</th><th>answers</th></tr></thead>
<tbody></tbody></table>
<script>
const token = new URLSearchParams(location.search).get("t") || "";
function cell(tr, v){ const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
async function refresh(){
  const r = await fetch("/api/admin/progress", {headers: {"X-Token": token}}); const d = await r.json();
  document.getElementById("summary").textContent = d.votes + " answers on " + d.pairs + " pairs; questions: " + d.questions.join(", ");
  const vb = document.querySelector("#voters tbody"); vb.innerHTML = "";
  for (const v of d.voters){ const tr = document.createElement("tr");
    [v.name + (v.revoked ? " (revoked)" : ""), v.role, v.votes, v.total, v.served,
     v.last_vote ? new Date(v.last_vote * 1000).toISOString().slice(0, 19) : "-"].forEach((x) => cell(tr, x)); vb.appendChild(tr); }
  const cb = document.querySelector("#comparisons tbody"); cb.innerHTML = "";
  for (const c of d.comparisons){ const tr = document.createElement("tr"); [c.models, c.pairs, c.votes].forEach((x) => cell(tr, x)); cb.appendChild(tr); }
}
refresh(); setInterval(refresh, 5000);
</script></body></html>
"""

FORBIDDEN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Forbidden</title></head>
<body><h1>403: this link needs a valid invite token</h1><p>Ask the organiser for your invite link.</p></body></html>"""
