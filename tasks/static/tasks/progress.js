/* Live task progress for the console: every element with data-task-id (status badges
 * and progress bars rendered by tasks/admin/common.py) is refreshed from the staff-only
 * JSON view named in its data-progress-url, about every 1.5 s, without reloading the
 * page. Finished tasks are no longer asked for. Plain JS, no dependencies. */
(function () {
  "use strict";

  var INTERVAL_MS = 1500;
  var HIDDEN_INTERVAL_MS = 10000;
  var MAX_IDS = 200;
  var FINAL = { completed: true, failed: true, cancelled: true, timeout: true };
  var failures = 0;
  var stopped = false;

  function taskElements() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-task-id][data-role]"));
  }

  function activeIds(elements) {
    var ids = {};
    elements.forEach(function (el) {
      if (!FINAL[el.getAttribute("data-status")]) {
        ids[el.getAttribute("data-task-id")] = true;
      }
    });
    return Object.keys(ids).slice(0, MAX_IDS);
  }

  function progressUrl(elements) {
    for (var i = 0; i < elements.length; i++) {
      var url = elements[i].getAttribute("data-progress-url");
      if (url) { return url; }
    }
    return null;
  }

  function setStatusClass(el, prefix, status) {
    el.className = el.className.split(/\s+/).filter(function (c) {
      return c.indexOf(prefix + "--") !== 0 || c === prefix + "--wide";
    }).concat([prefix + "--" + status]).join(" ");
  }

  function updateBadge(el, info) {
    setStatusClass(el, "tc-badge", info.status);
    el.setAttribute("data-status", info.status);
    el.textContent = info.status_display;
  }

  function updateBar(el, info) {
    setStatusClass(el, "tc-progress", info.status);
    el.setAttribute("data-status", info.status);
    el.setAttribute("aria-valuenow", String(info.progress));
    var bar = el.querySelector(".tc-progress__bar");
    if (bar) { bar.style.width = info.progress + "%"; }
    var label = el.querySelector(".tc-progress__label");
    if (label) {
      label.textContent = info.progress + "%";
      var msg = document.createElement("span");
      msg.className = "tc-progress__msg";
      msg.textContent = info.status_message ? " · " + info.status_message : "";
      label.appendChild(msg);
    }
  }

  function updateInstance(info) {
    if (!info.instance_id || !info.instance_status) { return; }
    var sel = '[data-role="instance-badge"][data-instance-id="' + info.instance_id + '"]';
    document.querySelectorAll(sel).forEach(function (el) {
      el.className = el.className.split(/\s+/).filter(function (c) {
        return c.indexOf("tc-badge--") !== 0;
      }).concat(["tc-badge--i-" + info.instance_status]).join(" ");
      el.textContent = info.instance_status_display || info.instance_status;
    });
  }

  function apply(data, elements) {
    elements.forEach(function (el) {
      var info = data[el.getAttribute("data-task-id")];
      if (!info) { return; }
      var role = el.getAttribute("data-role");
      if (role === "badge") { updateBadge(el, info); }
      else if (role === "progress") { updateBar(el, info); }
    });
    Object.keys(data).forEach(function (id) { updateInstance(data[id]); });
  }

  // The open task page's timeline grows with the task: rows after the last shown
  // event come from the task's events view (server-rendered, escaped), at the same cadence.
  function pollTimeline() {
    var table = document.querySelector('table[data-role="timeline"][data-live="1"]');
    if (!table) { return Promise.resolve(); }
    var url = table.getAttribute("data-events-url") + "?after=" + (table.getAttribute("data-last-id") || "0");
    return fetch(url, {
      credentials: "same-origin",
      headers: { "Accept": "application/json" },
      cache: "no-store"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (data) {
      if (data.previous_id && data.previous_duration) {
        var cell = table.querySelector('tr[data-event-id="' + data.previous_id + '"] [data-role="took"]');
        if (cell) { cell.textContent = data.previous_duration; }
      }
      if (data.rows && data.rows.trim()) {
        table.tBodies[0].insertAdjacentHTML("beforeend", data.rows);
        table.hidden = false;
        var empty = document.querySelector('[data-role="timeline-empty"]');
        if (empty) { empty.hidden = true; }
      }
      table.setAttribute("data-last-id", String(data.last_id));
      if (data.final) { table.setAttribute("data-live", "0"); }
    });
  }

  // The open provider page's health: a queue resumed by a probe shows as reachable
  // without a reload (server-rendered, escaped HTML from the provider's health view).
  function pollHealth() {
    var el = document.querySelector('[data-role="provider-health"][data-health-url]');
    if (!el) { return Promise.resolve(); }
    return fetch(el.getAttribute("data-health-url"), {
      credentials: "same-origin",
      headers: { "Accept": "application/json" },
      cache: "no-store"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (data) {
      if (typeof data.html === "string") { el.innerHTML = data.html; }
    });
  }

  function schedule() {
    if (stopped) { return; }
    var wait = document.hidden ? HIDDEN_INTERVAL_MS : INTERVAL_MS;
    // Back off while the server is unreachable (up to a minute).
    wait = Math.min(60000, wait * Math.pow(2, Math.min(failures, 5)));
    window.setTimeout(poll, wait);
  }

  function poll() {
    var elements = taskElements();
    var ids = activeIds(elements);
    var url = progressUrl(elements);
    if (!ids.length || !url) {
      Promise.all([pollTimeline(), pollHealth()]).then(function () {
        failures = 0;
      }).catch(function () { failures += 1; }).then(schedule);
      return;
    }
    fetch(url + "?ids=" + ids.join(","), {
      credentials: "same-origin",
      headers: { "Accept": "application/json" },
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 403) { stopped = true; return null; } // logged out
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (data) {
      if (data) { apply(data, taskElements()); }
      return pollTimeline();
    }).then(function () {
      failures = 0;
    }).catch(function () {
      failures += 1;
    }).then(schedule);
  }

  window.tcProgress = { poll: poll, pollTimeline: pollTimeline, pollHealth: pollHealth };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", schedule);
  } else {
    schedule();
  }
})();
