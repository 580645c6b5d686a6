// enrich review page: keyboard shortcuts, nothing else. Served as a file (the page's CSP forbids inline
// scripts); it reads no researched text and writes none into the page.
(function () {
  "use strict";
  var sent = false;
  function typing(el) {
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
  }
  function press(id) {
    var el = document.getElementById(id);
    if (!el || sent) return false;
    if (el.tagName === "BUTTON") sent = true; // one verdict per page: a held key does not send it twice
    el.click();
    return true;
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing) return;
    var t = ev.target;
    if (typing(t)) {
      if (t.id === "corrected" && ev.key === "Enter" && !ev.shiftKey) {
        ev.preventDefault(); // Enter sends the correction; Shift+Enter is a new line
        press("btn-correct");
      } else if (t.id === "reviewer" && ev.key === "Enter") {
        ev.preventDefault(); // the browser would submit with the first button (accept): a name is not a verdict
      } else if (ev.key === "Escape") {
        t.blur();
      }
      return;
    }
    if (ev.key === "c") {
      var box = document.getElementById("corrected");
      if (box) {
        ev.preventDefault();
        box.focus();
        box.select();
      }
      return;
    }
    var target = { a: "btn-accept", r: "btn-reject", j: "next", k: "prev", o: "open" }[ev.key];
    if (target && press(target)) ev.preventDefault();
  });
})();
