// Follows a running job on its page: polls /jobs/ID.json once a second until it ends.
(function () {
  "use strict";
  var box = document.getElementById("job");
  if (!box || box.dataset.state !== "running") { return; }
  function set(id, value) { var el = document.getElementById(id); if (el) { el.textContent = value; } }
  function poll() {
    fetch("/jobs/" + box.dataset.job + ".json", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (job) {
        var bar = document.getElementById("job-progress");
        bar.max = job.total; bar.value = job.done; bar.textContent = job.percent + "%";
        set("job-done", job.done); set("job-total", job.total); set("job-state", job.state);
        Object.keys(job.counts).forEach(function (k) { set("count-" + k, job.counts[k]); });
        if (job.error) { var e = document.getElementById("job-error"); e.hidden = false; e.textContent = job.error; }
        if (job.archive) {
          var a = document.getElementById("archive-link");
          a.href = "/archives/" + encodeURIComponent(job.archive); a.textContent = job.archive;
          document.getElementById("job-archive").hidden = false;
        }
        box.dataset.state = job.state;
        if (job.state === "running") { setTimeout(poll, 1000); }
      })
      .catch(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 500);
})();
