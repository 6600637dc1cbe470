"use strict";
const $ = (id) => document.getElementById(id);
const headers = () => ({"X-API-Key": $("key").value, "Content-Type": "application/json"});
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function call(path, body) {
  const r = await fetch(path, body ? {method: "POST", headers: headers(), body: JSON.stringify(body)} : {headers: headers()});
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status + ": " + (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)));
  return j;
}
function card(s) {
  const c = el("div", "card");
  const img = el("img");
  img.alt = "sample";
  img.src = "data:image/png;base64," + s.png_base64;
  c.append(img);
  for (const [name, w] of Object.entries(s.attribution || {})) {
    const bar = el("div", "bar"), track = el("div", "track"), fill = el("div", "fill");
    bar.dataset.compartment = name;
    fill.style.width = (100 * w).toFixed(1) + "%";
    track.append(fill);
    bar.append(el("span", "name", name), track, el("span", "", w.toFixed(2)));
    c.append(bar);
  }
  return c;
}
document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("click", async () => {
    $("msg").textContent = "";
    try {
      const c = await call("/v1/compartments");
      $("who").textContent = c.user + " may use: " + (c.compartments.join(", ") || "nothing at present");
      $("label").replaceChildren(new Option("(any)", ""), ...c.labels.map((l) => new Option(l, l)));
      $("label-box").hidden = c.text;
      $("prompt-box").hidden = !c.text;
    } catch (e) { $("msg").textContent = e.message; }
  });
  $("go").addEventListener("click", async () => {
    $("msg").textContent = "generating...";
    $("out").replaceChildren();
    try {
      const body = {n: parseInt($("n").value), router: $("router").value, steps: 25};
      if ($("label").value && $("prompt-box").hidden) body.label = $("label").value;
      if ($("prompt").value && !$("prompt-box").hidden) body.prompt = $("prompt").value;
      const g = await call("/v1/generate", body);
      $("msg").textContent = "";
      $("out").replaceChildren(...g.samples.map(card));
    } catch (e) { $("msg").textContent = e.message; }
  });
});
