/* Task dashboard: replace #tc-dashboard with a fresh server-rendered copy every
 * data-refresh-seconds (the charts are SVG rendered on the server); progress.js keeps
 * the progress bars moving in between. Skipped while the tab is hidden. */
(function () {
  "use strict";

  function refresh() {
    var current = document.getElementById("tc-dashboard");
    if (!current || document.hidden) { return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("tc-dashboard");
        if (fresh) { current.replaceWith(document.adoptNode(fresh)); }
      })
      .catch(function () { /* keep the old figures; try again next time */ });
  }

  function start() {
    var root = document.getElementById("tc-dashboard");
    var seconds = root ? parseInt(root.getAttribute("data-refresh-seconds"), 10) : 0;
    if (seconds > 0) { window.setInterval(refresh, seconds * 1000); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
