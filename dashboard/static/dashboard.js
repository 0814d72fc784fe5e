/* bitbench dashboard: draws embedded plotly figures, auto-submits selectors and refreshes
   live pages (<main data-live="SECONDS">) in place from ?partial=1 without a full reload. */
(function () {
  "use strict";
  var CONFIG = {responsive: true, displaylogo: false};

  function render(root) {
    if (!window.Plotly) return;
    root.querySelectorAll("[data-spec]").forEach(function (div) {
      var spec = document.getElementById(div.dataset.spec);
      if (!spec) return;
      var fig = JSON.parse(spec.textContent);
      Plotly.react(div, fig.data, fig.layout, CONFIG);
    });
  }

  function autosubmit(root) {
    root.querySelectorAll("[data-autosubmit]").forEach(function (el) {
      el.addEventListener("change", function () { el.form.submit(); });
    });
  }

  function live(main) {
    var seconds = Number(main.dataset.live) || 5;
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    function tick() {
      fetch(url, {cache: "no-store", headers: {"Accept": "text/html"}})
        .then(function (resp) { if (!resp.ok) throw new Error(resp.status); return resp.text(); })
        .then(function (html) {
          var tpl = document.createElement("template");
          tpl.innerHTML = html;
          var fresh = tpl.content.querySelector("main");
          if (!fresh) throw new Error("no <main> in partial");
          // Keep drawn plots (zoom, hover state) and update them in place.
          fresh.querySelectorAll("[data-spec]").forEach(function (div) {
            var old = document.getElementById(div.id);
            if (old && old.data) div.replaceWith(old);
          });
          main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
          render(main);
          autosubmit(main);
          if (fresh.hasAttribute("data-live")) setTimeout(tick, seconds * 1000);
          else main.removeAttribute("data-live");
        })
        .catch(function () { setTimeout(tick, 2 * seconds * 1000); });
    }
    setTimeout(tick, seconds * 1000);
  }

  function start() {
    render(document);
    autosubmit(document);
    var main = document.querySelector("main[data-live]");
    if (main) live(main);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
