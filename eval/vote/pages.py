"""The HTML pages of the voting app (plain HTML + a little JavaScript, no build step).

Every script and style is inline and allowed by its SHA-256 hash in the
Content-Security-Policy (:data:`CSP`), so the policy needs no ``'unsafe-inline'``: an
injected ``<script>`` would not run. Text from the database (prompts, names) is only
ever set with ``textContent``.
"""

from __future__ import annotations

import base64
import hashlib
import re

VOTE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image comparison</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:12px;color:#222}
 #prompt{background:#f4f4f4;border-radius:6px;padding:10px 14px;line-height:1.45;max-height:9em;overflow:auto}
 .imgs{display:flex;gap:12px;margin:12px 0}
 .imgs figure{flex:1 1 0;min-width:0;margin:0;text-align:center}
 .box{background:#fff;display:flex;align-items:center;justify-content:center}
 .imgs img{display:block;width:100%;height:auto;max-height:60vh;object-fit:contain}
 figcaption{font-weight:bold;font-size:1.3em}
 .buttons{display:flex;gap:12px;justify-content:center;flex-wrap:wrap}
 button{font-size:1.1em;padding:10px 22px;border-radius:6px;border:1px solid #888;background:#fff;cursor:pointer}
 button:hover:enabled{background:#eef}button:disabled{opacity:.45;cursor:wait}
 #question{font-size:1.25em;margin:10px 0;text-align:center}
 progress{width:100%;height:14px}.muted{color:#666;font-size:.9em}#error{color:#b00}
</style></head><body>
<div class="muted">Blind comparison: you do not know which model made which image. Sides are random.</div>
<progress id="bar" value="0" max="1"></progress><div id="progress" class="muted"></div>
<div id="task" hidden>
 <h3>Text</h3><div id="prompt"></div>
 <div id="question"></div>
 <div class="imgs"><figure><figcaption>A</figcaption><div class="box"><img id="imgA" alt="image A"></div></figure>
  <figure><figcaption>B</figcaption><div class="box"><img id="imgB" alt="image B"></div></figure></div>
 <div id="loading" class="muted">Loading both images&hellip; the buttons work once both are shown.</div>
 <div class="buttons"><button id="btnA" data-choice="A" disabled>A is better <span class="muted">[A / &larr;]</span></button>
  <button id="btnTie" data-choice="tie" disabled>Tie <span class="muted">[T / &darr;]</span></button>
  <button id="btnB" data-choice="B" disabled>B is better <span class="muted">[B / &rarr;]</span></button></div>
</div>
<div id="done" hidden><h2>All done. Thank you!</h2></div>
<div id="error"></div>
<script>
const token = new URLSearchParams(location.search).get("t") || "";
let task = null, busy = false, loaded = {A: false, B: false};
const $ = (id) => document.getElementById(id);
function showProgress(p){ $("bar").max = Math.max(p.total,1); $("bar").value = p.done;
  $("progress").textContent = p.done + " / " + p.total + " answers"; }
function canVote(){ return !busy && task && !task.done && loaded.A && loaded.B; }
function refresh(){
  const ok = canVote();
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = !ok;
  $("loading").hidden = !(task && !task.done && !(loaded.A && loaded.B));
  document.body.dataset.state = busy ? "busy" : (task && task.done ? "done" : (ok ? "ready" : "loading"));
}
async function api(path, body){
  const r = await fetch(path, {method: body ? "POST" : "GET", headers: {"X-Token": token, "Content-Type": "application/json"},
                               body: body ? JSON.stringify(body) : undefined});
  const data = await r.json().catch(() => ({}));
  if (!r.ok && !(r.status === 409 && data.code === "duplicate")) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
for (const side of ["A", "B"]) {
  const img = $("img" + side);
  img.addEventListener("load", () => { if (img.dataset.want === img.currentSrc || img.dataset.want === img.src) { loaded[side] = true; refresh(); } });
  img.addEventListener("error", () => { $("error").textContent = "Image " + side + " could not be shown; reload the page for another pair."; });
}
async function load(){
  task = await api("/api/next"); showProgress(task.progress);
  if (task.done){ $("task").hidden = true; $("done").hidden = false; refresh(); return; }
  $("prompt").textContent = task.prompt;
  loaded = {A: false, B: false};
  for (const side of ["A", "B"]) {
    const img = $("img" + side), url = new URL("/image/" + task.pair_id + "/" + side + "?t=" + encodeURIComponent(token), location.href).href;
    img.dataset.want = url;
    if (img.src === url && img.complete && img.naturalWidth > 0) loaded[side] = true; else img.src = url;
  }
  $("question").textContent = task.questions[0].text; $("task").hidden = false; refresh();
}
async function vote(choice){
  if (!canVote()) return; busy = true; refresh(); $("error").textContent = "";
  try {
    const q = task.questions[0];
    const res = await api("/api/vote", {pair_id: task.pair_id, question: q.id, choice: choice});
    task.questions.shift();
    showProgress(res.progress || task.progress);
    if (task.questions.length) $("question").textContent = task.questions[0].text; else await load();
  } catch (e) { $("error").textContent = e.message; } finally { busy = false; refresh(); }
}
for (const b of document.querySelectorAll("button[data-choice]")) b.addEventListener("click", () => vote(b.dataset.choice));
document.addEventListener("keydown", (e) => {
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;  // a held key is one answer, shortcuts stay shortcuts
  const k = e.key.toLowerCase();
  if (k === "a" || k === "arrowleft") vote("A"); else if (k === "b" || k === "arrowright") vote("B");
  else if (k === "t" || k === "arrowdown") vote("tie");
});
busy = true; refresh();
load().catch((e) => { $("error").textContent = e.message; }).finally(() => { busy = false; refresh(); });
</script></body></html>
"""

ADMIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Voting progress</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;margin:16px}table{border-collapse:collapse;margin:10px 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f4f4f4}
.scroll{overflow-x:auto;max-width:100%}.muted{color:#666}</style></head><body>
<h1>Voting progress</h1><div id="summary"></div>
<p class="muted">Admin tokens see the models here and cannot vote. Votes of revoked voters are kept in the
database and left out of the report unless <code>eval.vote.count_revoked</code> is true.</p>
<h2>Voters</h2><div class="scroll"><table id="voters"><thead><tr><th>voter</th><th>role</th><th>answers</th><th>of</th>
<th>pairs served</th><th>last answer (UTC)</th></tr></thead><tbody></tbody></table></div>
<h2>Comparisons</h2><div class="scroll"><table id="comparisons"><thead><tr><th>models</th><th>pairs</th><th>answers</th></tr></thead>
<tbody></tbody></table></div>
<h2>Withdrawn pairs</h2><div class="scroll"><table id="withdrawn"><thead><tr><th>pair</th><th>models</th><th>why</th></tr>
</thead><tbody></tbody></table></div>
<h2>Pairs</h2><div class="scroll"><table id="pairs"><thead><tr><th>pair</th><th>prompt</th><th>seed</th><th>model x</th>
<th>model y</th><th>served</th><th>answers</th></tr></thead><tbody></tbody></table></div>
<script>
const token = new URLSearchParams(location.search).get("t") || "";
function cell(tr, v){ const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); return td; }
function link(tr, text, href){ const td = document.createElement("td"); const a = document.createElement("a");
  a.textContent = text; a.href = href; a.target = "_blank"; a.rel = "noopener"; td.appendChild(a); tr.appendChild(td); }
async function get(path){ const r = await fetch(path, {headers: {"X-Token": token}}); return r.json(); }
async function refresh(){
  const d = await get("/api/admin/progress");
  document.getElementById("summary").textContent = d.votes + " answers on " + d.pairs + " pairs (" + d.withdrawn +
    " withdrawn: an image cannot be shown); questions: " + d.questions.join(", ");
  const wb = document.querySelector("#withdrawn tbody"); wb.replaceChildren();
  for (const w of d.withdrawn_pairs){ const tr = document.createElement("tr");
    [w.pair_id, w.model_x + " vs " + w.model_y, w.reason].forEach((x) => cell(tr, x)); wb.appendChild(tr); }
  const vb = document.querySelector("#voters tbody"); vb.replaceChildren();
  for (const v of d.voters){ const tr = document.createElement("tr");
    [v.name + (v.revoked ? " (revoked)" : ""), v.role, v.votes, v.total, v.served,
     v.last_vote ? new Date(v.last_vote * 1000).toISOString().slice(0, 19) : "-"].forEach((x) => cell(tr, x)); vb.appendChild(tr); }
  const cb = document.querySelector("#comparisons tbody"); cb.replaceChildren();
  for (const c of d.comparisons){ const tr = document.createElement("tr"); [c.models, c.pairs, c.votes].forEach((x) => cell(tr, x)); cb.appendChild(tr); }
  const p = await get("/api/admin/pairs");
  const pb = document.querySelector("#pairs tbody"); pb.replaceChildren();
  for (const r of p.pairs){ const tr = document.createElement("tr");
    cell(tr, r.id); cell(tr, r.prompt_set + " / " + r.prompt_id); cell(tr, r.seed);
    const t = "?t=" + encodeURIComponent(token);
    link(tr, r.model_x, "/admin/image/" + r.id + "/x" + t); link(tr, r.model_y, "/admin/image/" + r.id + "/y" + t);
    cell(tr, r.n_served); cell(tr, r.votes); pb.appendChild(tr); }
}
refresh(); setInterval(refresh, 5000);
</script></body></html>
"""

FORBIDDEN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Forbidden</title></head>
<body><h1>403: this link needs a valid invite token</h1><p>Ask the organiser for your invite link.</p></body></html>"""

ADMIN_CANNOT_VOTE_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Forbidden</title></head>
<body><h1>403: admin tokens cannot vote</h1><p>An admin sees which model made which image, so its votes
would not be blind. Open the <a href="/admin">admin page</a> with this token, or ask for a voter invite.</p>
</body></html>"""


def _hashes(tag: str) -> list[str]:
    pages = (VOTE_PAGE, ADMIN_PAGE, FORBIDDEN_PAGE, ADMIN_CANNOT_VOTE_PAGE)
    out = []
    for page in pages:
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            out.append(f"'sha256-{digest}'")
    return sorted(set(out))


#: The Content-Security-Policy of every response: nothing loads or runs but this
#: server's images and API and the pages' own (hashed) inline script and style; no
#: page may be framed (frame-ancestors, plus X-Frame-Options for old browsers).
CSP = "; ".join(
    [
        "default-src 'none'",
        f"script-src {' '.join(_hashes('script'))}",
        f"style-src {' '.join(_hashes('style'))}",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
