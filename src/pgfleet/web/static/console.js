// pgfleet console: copy and reveal buttons, operation progress, SQL history.
// Everything works without it, a little less conveniently.
"use strict";

document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest("button.reveal, button.copy");
  if (!btn) return;
  const input = document.getElementById(btn.dataset.target);
  if (btn.classList.contains("reveal")) {
    const shown = btn.getAttribute("aria-pressed") === "true";
    input.value = shown ? input.dataset.masked : input.dataset.secret;
    btn.setAttribute("aria-pressed", String(!shown));
    btn.textContent = shown ? "Reveal" : "Hide";
  } else {
    try {
      await navigator.clipboard.writeText(input.dataset.secret);
      btn.textContent = "Copied";
    } catch (e) {
      input.value = input.dataset.secret;
      input.select();
      btn.textContent = "Press Ctrl+C";
    }
    setTimeout(() => { btn.textContent = "Copy"; }, 2000);
  }
});

// Operation progress: poll until it ends, then reload the page.
const progress = document.querySelector("[data-progress]");
if (progress) {
  const tick = async () => {
    const r = await fetch(progress.dataset.progress, { credentials: "same-origin" });
    if (!r.ok) return;
    const op = await r.json();
    progress.querySelector("[data-status]").textContent = op.status;
    progress.querySelector("[data-step]").textContent = op.current_step || "-";
    const done = op.steps.filter((s) => s.status === "finished").length;
    const bar = progress.querySelector("[data-bar]");
    bar.max = Math.max(op.steps.length, 1);
    bar.value = done;
    if (["finished", "failed", "cancelled"].includes(op.status)) {
      const url = new URL(window.location.href);
      url.searchParams.delete("op");
      window.location.replace(url.toString());
    } else {
      setTimeout(tick, 250);
    }
  };
  tick();
}

// SQL history: the last 20 queries of this database, kept in this browser.
const sqlForm = document.getElementById("sql-form");
if (sqlForm) {
  const key = sqlForm.dataset.history;
  const list = document.getElementById("sql-history");
  const load = () => JSON.parse(localStorage.getItem(key) || "[]");
  for (const q of load()) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "link";
    b.textContent = q;  // text, never HTML
    b.addEventListener("click", () => { sqlForm.query.value = q; sqlForm.query.focus(); });
    li.appendChild(b);
    list.appendChild(li);
  }
  sqlForm.addEventListener("submit", () => {
    const q = sqlForm.query.value.trim();
    if (!q) return;
    const h = [q, ...load().filter((x) => x !== q)].slice(0, 20);
    localStorage.setItem(key, JSON.stringify(h));
  });
}
