/* qkv's drawing of matrices, shared by the server's page (`qkv serve`) and `qkv explain --html`.

   A matrix is drawn as a grid of coloured cells with its label and shape, as the seed's pictures of
   self-attention draw Q, K and V: a person looks at it rather than reads it. Two scales:
   - "weights": attention weights, 0 white to 1 dark blue, the same in every picture;
   - "diverging": vectors and scores, blue above 0 and orange below, white at 0, scaled to the largest
     |value| of the step so that the heads of one step compare.
   Hovering a cell shows its number (and its row and column) under the grid; every cell also keeps its
   value in data-v, which the browser test compares with qkv.explain's. */
var QKV = (function () {
  "use strict";

  function weightColour(w) {
    w = Math.max(0, Math.min(1, w));
    return "rgb(" + Math.round(255 - 222 * w) + "," + Math.round(255 - 180 * w) + "," +
      Math.round(255 - 75 * w) + ")";
  }

  function divergingColour(v, limit) {
    var t = limit > 0 ? Math.max(-1, Math.min(1, v / limit)) : 0;
    var to = t >= 0 ? [33, 102, 172] : [214, 96, 37];
    var a = Math.abs(t);
    return "rgb(" + Math.round(255 + (to[0] - 255) * a) + "," + Math.round(255 + (to[1] - 255) * a) +
      "," + Math.round(255 + (to[2] - 255) * a) + ")";
  }

  function largest(matrices) {
    var limit = 0;
    matrices.forEach(function (m) {
      m.values.forEach(function (row) {
        row.forEach(function (v) { limit = Math.max(limit, Math.abs(v)); });
      });
    });
    return limit;
  }

  function element(tag, className, text) {
    var el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = text;
    return el;
  }

  function formatNumber(v) {
    return (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(4)).replace(/^-0\.0000$/, "0.0000");
  }

  /* Cell width: token columns stay readable; feature columns shrink so that d_model of them fit. */
  function cellWidth(cols, tokens, compact) {
    if (tokens) return compact ? 9 : Math.max(10, Math.min(22, Math.floor(560 / cols)));
    return Math.max(2, Math.min(compact ? 6 : 14, Math.floor((compact ? 260 : 640) / cols)));
  }

  /* One matrix as a <figure>: m = {label, shape, values, row_labels, col_labels}.
     options: scale ("weights" | "diverging"), limit (diverging), compact (small multiples),
     onRow(rowIndex | null) when the pointer enters or leaves a row. */
  function matrix(m, options) {
    options = options || {};
    var scale = options.scale || "diverging";
    var limit = options.limit !== undefined ? options.limit : largest([m]);
    var rows = m.values.length, cols = rows ? m.values[0].length : 0;
    var tokens = !!m.col_labels;
    var width = cellWidth(cols, tokens, options.compact);
    // token by token (attention weights) square; feature rows low, so that d_model columns stay short
    var height = options.compact ? 9 : (tokens ? Math.max(12, Math.min(width, 18)) : 12);
    var figure = element("figure", "qkv-matrix" + (options.compact ? " compact" : ""));
    figure.dataset.label = m.label;
    var caption = element("figcaption");
    caption.appendChild(element("b", null, m.label));
    caption.appendChild(element("span", "qkv-shape", " " + rows + " \u00d7 " + cols));
    figure.appendChild(caption);

    var grid = element("div", "qkv-grid");
    grid.dataset.rows = rows;
    grid.dataset.cols = cols;
    var labelColumn = options.compact ? "0" : "max-content";
    grid.style.gridTemplateColumns = labelColumn + " repeat(" + cols + ", " + width + "px)";
    grid.style.gridAutoRows = height + "px";
    if (tokens && !options.compact) grid.style.gridTemplateRows = "max-content";  // the column labels
    if (tokens && !options.compact) {
      grid.appendChild(element("span", "qkv-corner"));
      m.col_labels.forEach(function (label, c) {
        var th = element("span", "qkv-col-label", label);
        th.dataset.c = c;
        grid.appendChild(th);
      });
    }
    var colour = scale === "weights" ? weightColour : function (v) { return divergingColour(v, limit); };
    m.values.forEach(function (row, r) {
      var label = element("span", "qkv-row-label", options.compact ? "" : m.row_labels[r]);
      label.dataset.r = r;
      grid.appendChild(label);
      row.forEach(function (v, c) {
        var cell = element("i", "qkv-cell");
        cell.dataset.r = r;
        cell.dataset.c = c;
        cell.dataset.v = v;
        cell.style.background = colour(v);
        grid.appendChild(cell);
      });
    });
    figure.appendChild(grid);
    var readout = element("output", "qkv-readout", "\u00a0");
    if (!options.compact) figure.appendChild(readout);

    function columnName(c) { return tokens ? m.col_labels[c] : "feature " + c; }
    var marked = [];
    function unmark() {
      marked.forEach(function (el) { el.classList.remove("qkv-on"); });
      marked = [];
    }
    grid.addEventListener("mouseover", function (event) {
      var target = event.target;
      if (target.dataset.r === undefined) return;
      var r = Number(target.dataset.r);
      unmark();
      grid.querySelectorAll(".qkv-row-label[data-r='" + r + "']").forEach(function (el) {
        el.classList.add("qkv-on"); marked.push(el);
      });
      if (target.dataset.c !== undefined && target.classList.contains("qkv-cell")) {
        var c = Number(target.dataset.c);
        grid.querySelectorAll(".qkv-col-label[data-c='" + c + "']").forEach(function (el) {
          el.classList.add("qkv-on"); marked.push(el);
        });
        target.classList.add("qkv-on"); marked.push(target);
        readout.textContent = m.label + " [" + m.row_labels[r] + ", " + columnName(c) + "] = " +
          formatNumber(Number(target.dataset.v));
      } else {
        readout.textContent = m.row_labels[r];
      }
      if (options.onRow) options.onRow(r);
    });
    grid.addEventListener("mouseleave", function () {
      unmark();
      readout.textContent = "\u00a0";
      if (options.onRow) options.onRow(null);
    });
    return figure;
  }

  /* A legend for a scale: a strip of colour with its end values. */
  function legend(scale, limit) {
    var box = element("div", "qkv-legend");
    var low = scale === "weights" ? 0 : -limit, high = scale === "weights" ? 1 : limit;
    box.appendChild(element("span", null, formatNumber(low)));
    var strip = element("span", "qkv-legend-strip");
    for (var i = 0; i <= 10; i++) {
      var swatch = element("i");
      var v = low + (high - low) * i / 10;
      swatch.style.background = scale === "weights" ? weightColour(v) : divergingColour(v, limit);
      strip.appendChild(swatch);
    }
    box.appendChild(strip);
    box.appendChild(element("span", null, formatNumber(high)));
    return box;
  }

  /* The step-by-step of one attention sublayer (qkv.explain's JSON) into `container`. */
  function steps(container, explanation) {
    container.innerHTML = "";
    container.appendChild(element("h2", null, explanation.title));
    (explanation.notes || []).forEach(function (note) {
      container.appendChild(element("p", "qkv-note", note));
    });
    explanation.steps.forEach(function (step, number) {
      var section = element("section", "qkv-step");
      section.dataset.step = step.name;
      section.appendChild(element("h3", null, (number + 1) + ". " + step.name));
      section.appendChild(element("p", "qkv-description", step.description));
      var scale = step.scale || "diverging";
      var limit = largest(step.matrices);
      section.appendChild(legend(scale, limit));
      var row = element("div", "qkv-matrices");
      step.matrices.forEach(function (m) {
        row.appendChild(matrix(m, { scale: scale, limit: limit }));
      });
      section.appendChild(row);
      container.appendChild(section);
    });
  }

  return {
    weightColour: weightColour,
    divergingColour: divergingColour,
    matrix: matrix,
    legend: legend,
    steps: steps,
    element: element,
    formatNumber: formatNumber
  };
})();
