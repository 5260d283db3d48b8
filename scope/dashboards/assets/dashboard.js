// Sorting and filtering of the index table; token values on hover come from each token's title.
(function () {
  const table = document.getElementById("features");
  if (!table) return;
  const body = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      const asc = !th.classList.contains("asc");
      heads.forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      const num = th.dataset.type === "num";
      const key = function (tr) {
        const cell = tr.cells[col];
        return num ? parseFloat(cell.dataset.v) : cell.textContent.toLowerCase();
      };
      const rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        const x = key(a), y = key(b);
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (tr) { body.appendChild(tr); });
    });
  });
  const search = document.getElementById("search");
  search.addEventListener("input", function () {
    const q = search.value.trim().toLowerCase();
    Array.from(body.rows).forEach(function (tr) {
      const tokens = Array.from(tr.querySelectorAll(".chip")).map(function (c) { return c.textContent.toLowerCase(); });
      tr.hidden = q !== "" && tr.dataset.feature !== q && !tokens.some(function (t) { return t.includes(q); });
    });
  });
})();
