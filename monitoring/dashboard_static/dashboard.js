// Reload the page when the state file changes (the runner rewrites it while it streams). The page itself is
// rendered on the server, so this is the only script, and the dashboard still works with scripts off.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var last = null;
  function poll() {
    fetch("/api/stamp", { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (d) {
        var stamp = JSON.stringify(d.stamp);
        if (last !== null && stamp !== last) { window.location.reload(); return; }
        last = stamp;
        if (live) { live.textContent = "- live"; }
      })
      .catch(function () { if (live) { live.textContent = "- dashboard server unreachable"; } });
  }
  poll();
  window.setInterval(poll, 3000);
}());
