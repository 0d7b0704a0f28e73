// A refused login answers 401 with this page again: say so (only the status tells).
"use strict";
const nav = performance.getEntriesByType("navigation")[0];
if (nav && nav.responseStatus === 401) {
  const p = document.getElementById("hint");
  p.textContent = "That token was refused.";
  p.className = "error";
  p.id = "refused";
}
