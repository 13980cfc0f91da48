// pgfleet console: copy and reveal buttons, operation progress, SQL history.
// Everything works without it, a little less conveniently.
"use strict";

// The page never holds a password: revealing or copying one asks the server
// for it (a POST with the session's CSRF token), and it is kept nowhere.
async function fetchSecret(input) {
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const body = new URLSearchParams({
    csrf,
    mode: input.dataset.mode,
    pooling: input.dataset.pooling || "session",
    direct: input.dataset.direct || "false",
  });
  const r = await fetch(input.dataset.reveal, {
    method: "POST",
    body,
    credentials: "same-origin",
    cache: "no-store",
  });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return (await r.json()).uri;
}

// What cannot be undone asks first, as the CLI does (rotate, revoke).
document.addEventListener("submit", (ev) => {
  const ask = ev.target.dataset && ev.target.dataset.confirm;
  if (ask && !window.confirm(ask)) ev.preventDefault();
});

document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest("button.reveal, button.copy");
  if (!btn) return;
  const input = document.getElementById(btn.dataset.target);
  if (btn.classList.contains("reveal")) {
    const shown = btn.getAttribute("aria-pressed") === "true";
    if (shown) {
      input.value = input.dataset.masked;
    } else {
      try {
        input.value = await fetchSecret(input);
      } catch (e) {
        btn.textContent = "Failed: reload";
        return;
      }
    }
    btn.setAttribute("aria-pressed", String(!shown));
    btn.textContent = shown ? "Reveal" : "Hide";
  } else {
    let secret;
    try {
      secret = await fetchSecret(input);
    } catch (e) {
      btn.textContent = "Failed: reload";
      return;
    }
    try {
      await navigator.clipboard.writeText(secret);
      btn.textContent = "Copied";
    } catch (e) {
      input.value = secret;
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
    const done = op.steps.filter((s) => ["finished", "skipped"].includes(s.status)).length;
    const bar = progress.querySelector("[data-bar]");
    bar.max = Math.max(op.steps.length, 1);
    bar.value = done;
    if (["finished", "failed", "cancelled"].includes(op.status)) {
      // A failed one keeps its id in the address: the page then says why,
      // even when what it was making is gone again.
      const url = new URL(window.location.href);
      if (op.status === "finished") url.searchParams.delete("op");
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
