"use strict";
const $ = (id) => document.getElementById(id);
let model = null;
let lastResults = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function show(view) {
  for (const name of ["grade", "browse"]) {
    $("view-" + name).classList.toggle("hidden", name !== view);
    $("tab-" + name).classList.toggle("active", name === view);
  }
}
$("tab-grade").onclick = () => show("grade");
$("tab-browse").onclick = () => show("browse");

async function loadModel() {
  model = await (await fetch("/api/model")).json();
  $("model").textContent = `${model.workdir} · ${model.tasks.map((t) => model.task_names[t]).join(", ")} · ${model.pooling} pooling`;
  const l = model.limits;
  $("limits").textContent = `At most ${l.max_files} files per grading, ${l.max_file_mb} MB each.`;
  const select = $("split");
  for (const split of model.splits) select.append(el("option", {value: split}, split));
  if (model.splits.length) { loadSplit(model.splits.includes("validation") ? "validation" : model.splits[0]); }
  else { $("split-note").textContent = "No evaluated split: run python run.py --mode=evaluate --workdir=... first."; }
}

// ---------------------------------------------------------------- grade
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); grade(e.dataTransfer.files); });
$("grade").onclick = () => grade($("files").files);

async function grade(files) {
  if (!files || !files.length) { $("status").textContent = "Choose or drop radiograph files first."; return; }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  form.append("side", $("side").value);
  $("status").textContent = `Grading ${files.length} file(s)...`;
  const started = performance.now();
  let answer;
  try {
    const response = await fetch("/api/grade", {method: "POST", body: form});
    answer = await response.json();
    if (!response.ok) { $("status").textContent = ""; $("status").append(el("span", {class: "error"}, answer.error)); return; }
  } catch (error) {
    $("status").textContent = `The server did not answer: ${error}`; return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  $("status").textContent = `${answer.results.length} knee(s) graded in ${seconds} s` +
    (answer.errors.length ? `, ${answer.errors.length} file(s) not graded` : "") + ".";
  $("status").dataset.seconds = seconds;
  lastResults = lastResults.concat(answer.results);
  const list = $("results");
  for (const e of answer.errors) list.prepend(el("div", {class: "knee error", "data-error": e.file}, `${e.file}: ${e.error}`));
  for (const r of answer.results.slice().reverse()) list.prepend(renderKnee(r));
  updateDownload();
}

function renderKnee(r) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "grade"), el("th", {}, "predicted"), el("th", {}, "probabilities")));
  for (const [task, g] of Object.entries(r.grades)) {
    const probs = el("td", {style: "text-align:left"});
    g.probabilities.forEach((p, k) => {
      probs.append(el("div", {}, `${k}: `, el("span", {class: "bar", style: `width:${Math.round(p * 120)}px`}), ` ${p.toFixed(3)}`));
    });
    table.append(el("tr", {}, el("td", {}, model.task_names[task] || task),
      el("td", {"data-task": task, class: "predicted"}, g.grade), probs));
  }
  const facts = el("div", {},
    el("h3", {}, r.file),
    el("p", {}, `Side: ${r.side} (${r.side_from})` + (r.polarity_inverted ? "; grey levels inverted back" : "")),
    table,
    el("p", {}, `Keypoints: ${r.keypoints.source}`));
  if (r.coherence_log_prob !== null) {
    const text = `Coherence (GMM log-density of the predicted grade vector): ${r.coherence_log_prob.toFixed(1)}`;
    facts.append(r.coherence_low
      ? el("p", {class: "low"}, text + ` — unusually low (${model.coherence_threshold_text}): look again`)
      : el("p", {}, text + (model.coherence_threshold === null ? ` (${model.coherence_threshold_text})` : "")));
  }
  return el("div", {class: "knee", "data-file": r.file}, el("img", {src: r.overlay, alt: `overlay of ${r.file}`}), facts);
}

function csvCell(value) {
  const text = String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function updateDownload() {
  if (!lastResults.length) return;
  const tasks = model.tasks;
  const header = ["file", "side", ...tasks];
  for (const t of tasks) lastResults[0].grades[t].probabilities.forEach((_, k) => header.push(`${t}_p${k}`));
  header.push("coherence_log_prob", "coherence_low", "keypoints");
  const rows = [header];
  for (const r of lastResults) {
    const row = [r.file, r.side, ...tasks.map((t) => r.grades[t].grade)];
    for (const t of tasks) row.push(...r.grades[t].probabilities);
    row.push(r.coherence_log_prob === null ? "" : r.coherence_log_prob, r.coherence_low === null ? "" : r.coherence_low, r.keypoints.source);
    rows.push(row);
  }
  const text = rows.map((row) => row.map(csvCell).join(",")).join("\n") + "\n";
  const link = $("download");
  link.href = "data:text/csv;charset=utf-8," + encodeURIComponent(text);
  link.classList.remove("hidden");
}

// ---------------------------------------------------------------- browse
let currentSplit = null;
let cellKnees = [];

$("split").onchange = (e) => loadSplit(e.target.value);
$("sort").onchange = () => renderCell();

async function loadSplit(split) {
  currentSplit = split;
  $("split").value = split;
  const summary = await (await fetch(`/api/split/${encodeURIComponent(split)}`)).json();
  $("split-note").textContent = `${summary.count} knees` + (summary.pictures ? "" : " (the built dataset is not readable here: no pictures)");
  const box = $("matrices");
  box.textContent = "";
  for (const [task, info] of Object.entries(summary.tasks)) {
    const m = info.metrics;
    const fmt = (x) => (x === undefined || x === null || Number.isNaN(x)) ? "–" : Number(x).toFixed(3);
    const metrics = el("table", {class: "metrics", "data-task": task},
      el("tr", {}, el("th", {}, "accuracy"), el("th", {}, "balanced"), el("th", {}, "RMSE"), el("th", {}, "kappa"), el("th", {}, "knees")),
      el("tr", {}, el("td", {}, fmt(m.accuracy)), el("td", {}, fmt(m.balanced_accuracy)), el("td", {}, fmt(m.rmse)), el("td", {}, fmt(m.kappa)), el("td", {}, m.count)));
    const matrix = el("table", {class: "matrix", "data-task": task});
    const head = el("tr", {}, el("th", {}, "true \\ predicted"));
    info.confusion.forEach((_, p) => head.append(el("th", {}, p)));
    matrix.append(head);
    info.confusion.forEach((row, t) => {
      const tr = el("tr", {}, el("th", {}, t));
      row.forEach((count, p) => {
        const td = el("td", {class: "cell" + (t === p ? " diagonal" : ""), "data-true": t, "data-pred": p}, count);
        td.onclick = () => openCell(task, info.name, t, p, td);
        tr.append(td);
      });
      matrix.append(tr);
    });
    box.append(el("div", {class: "task"}, el("h3", {}, info.name), matrix, el("p"), metrics));
  }
}

async function openCell(task, name, t, p, td) {
  for (const node of document.querySelectorAll(".matrix td.selected")) node.classList.remove("selected");
  td.classList.add("selected");
  const answer = await (await fetch(`/api/split/${encodeURIComponent(currentSplit)}/cell?task=${task}&true=${t}&pred=${p}`)).json();
  cellKnees = answer.knees;
  $("cell-title").textContent = `${name}: true ${t}, predicted ${p} — ${cellKnees.length} knee(s)`;
  $("cell-sort").classList.remove("hidden");
  renderCell();
}

function renderCell() {
  const order = $("sort").value === "asc" ? 1 : -1;
  const knees = cellKnees.slice().sort((a, b) => order * (a.confidence - b.confidence));
  const list = $("cell-list");
  list.textContent = "";
  for (const k of knees.slice(0, 60)) {
    const item = el("div", {class: "item", "data-index": k.index},
      el("div", {}, `${k.image_id || "#" + k.index}: true ${k.true}, predicted ${k.pred}, confidence ${k.confidence.toFixed(3)}`));
    const img = el("img", {src: `/api/split/${encodeURIComponent(currentSplit)}/knee/${k.index}.png`, alt: `knee ${k.index}`, loading: "lazy"});
    img.onerror = () => img.remove();
    item.append(img);
    list.append(item);
  }
  if (knees.length > 60) list.append(el("p", {class: "note"}, `the first 60 of ${knees.length} shown`));
}

loadModel();
