"""A circuit as one self-contained interactive HTML page: inline SVG drawn by inline JavaScript, no network.

Nodes stand in one column per SAE hook (in the order the hooks run), the largest |attribution| at the top;
a node's area grows with |attribution|, its colour is the sign (blue: patching it raises the metric, red:
lowers it; grey ring: an error node). Edges are drawn with a width that grows with |attribution|. Hovering a
node or an edge shows its details; clicking a node opens its feature dashboard when a link is given (the
node is an SVG ``<a>``). With ``images``, each feature node shows its top images (as PNG ``data:`` URIs, so
the page stays self-contained) under its label, and a table below the graph lists every node with its label,
top images and dashboard link.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from sae_lens_multimodal.core.atomic import atomic_write_text

__all__ = ["circuit_html", "image_uri", "write_circuit_html"]

Links = Union[Mapping[str, Mapping[int, str]], Callable[[str, int], Optional[str]], None]
#: ``{hook: {feature: [image, ...]}}``, ``{node id: [image, ...]}`` (per position) or ``(hook, feature) ->
#: [image, ...]``; an image is a uint8 array [H, W, 3] (or [H, W]), a PIL image, PNG bytes or a data: URI
Images = Union[Mapping[str, Any], Callable[[str, int], Optional[Sequence[Any]]], None]
THUMB = 28  # px: side of a top-image thumbnail in the graph

_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('circuit-data').textContent);
  const NS = 'http://www.w3.org/2000/svg';
  const nThumbs = Math.max(0, ...data.nodes.map(n => (n.images || []).length));
  const thumb = THUMB_PX;
  const colW = Math.max(260, 40 + nThumbs * (thumb + 3)), rowH = nThumbs ? 40 + thumb : 34, top = 50, left = 40;
  const svg = document.getElementById('circuit-graph');
  const tip = document.getElementById('tooltip');
  const byHook = {};
  data.hooks.forEach(h => byHook[h] = []);
  data.nodes.forEach(n => (byHook[n.hook] = byHook[n.hook] || []).push(n));
  const maxNode = Math.max(1e-12, ...data.nodes.map(n => Math.abs(n.attribution)));
  const maxEdge = Math.max(1e-12, ...data.edges.map(e => Math.abs(e.attribution)));
  const pos = {};
  let rows = 1;
  data.hooks.forEach((h, c) => {
    const col = byHook[h].sort((a, b) => Math.abs(b.attribution) - Math.abs(a.attribution));
    rows = Math.max(rows, col.length);
    col.forEach((n, r) => pos[n.id] = [left + 60 + c * colW, top + 20 + r * rowH]);
    const t = document.createElementNS(NS, 'text');
    t.setAttribute('x', left + 60 + c * colW); t.setAttribute('y', top - 20);
    t.setAttribute('class', 'hook'); t.textContent = h;
    svg.appendChild(t);
  });
  svg.setAttribute('width', left * 2 + 120 + Math.max(1, data.hooks.length) * colW);
  svg.setAttribute('height', top + 40 + rows * rowH);
  function show(ev, text) { tip.textContent = text; tip.style.display = 'block';
    tip.style.left = (ev.pageX + 12) + 'px'; tip.style.top = (ev.pageY + 12) + 'px'; }
  function hide() { tip.style.display = 'none'; }
  data.edges.forEach((e, i) => {
    if (!(e.source in pos) || !(e.target in pos)) return;
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
    const p = document.createElementNS(NS, 'path');
    const mx = (x1 + x2) / 2;
    p.setAttribute('d', `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`);
    p.setAttribute('id', 'edge-' + i);
    p.setAttribute('class', 'edge ' + (e.attribution >= 0 ? 'pos' : 'neg'));
    p.setAttribute('stroke-width', (0.5 + 6 * Math.abs(e.attribution) / maxEdge).toFixed(2));
    p.addEventListener('mousemove', ev => show(ev, `edge ${e.source} -> ${e.target}\nattribution ${e.attribution.toPrecision(4)}`));
    p.addEventListener('mouseleave', hide);
    svg.appendChild(p);
  });
  data.nodes.forEach((n, i) => {
    const [x, y] = pos[n.id];
    const parent = n.link ? document.createElementNS(NS, 'a') : document.createElementNS(NS, 'g');
    if (n.link) { parent.setAttribute('href', n.link); parent.setAttribute('target', '_blank'); }
    parent.setAttribute('id', 'node-' + i);
    parent.setAttribute('class', 'node');
    const c = document.createElementNS(NS, 'circle');
    c.setAttribute('cx', x); c.setAttribute('cy', y);
    c.setAttribute('r', (4 + 10 * Math.sqrt(Math.abs(n.attribution) / maxNode)).toFixed(2));
    c.setAttribute('class', (n.attribution >= 0 ? 'pos' : 'neg') + (n.feature === 'error' ? ' error' : ''));
    const t = document.createElementNS(NS, 'text');
    t.setAttribute('x', x + 18); t.setAttribute('y', y + 4);
    const name = n.feature === 'error' ? 'error' : '#' + n.feature;
    t.textContent = `${name} @${n.position.join(',')}` + (n.label ? ` ${n.label}` : '');
    parent.appendChild(c); parent.appendChild(t);
    (n.images || []).forEach((src, j) => {
      const im = document.createElementNS(NS, 'image');
      im.setAttribute('href', src); im.setAttribute('class', 'thumb');
      im.setAttribute('x', x + 18 + j * (thumb + 3)); im.setAttribute('y', y + 9);
      im.setAttribute('width', thumb); im.setAttribute('height', thumb);
      parent.appendChild(im);
    });
    const info = `${n.hook}\nfeature ${n.feature}, position ${n.position.join(',')}\nattribution ` +
      n.attribution.toPrecision(4) + (n.label ? `\nlabel: ${n.label}` : '') + (n.link ? '\n(click: dashboard)' : '');
    parent.addEventListener('mousemove', ev => show(ev, info));
    parent.addEventListener('mouseleave', hide);
    svg.appendChild(parent);
  });
  const table = document.getElementById('node-table');
  if (table && data.nodes.some(n => (n.images || []).length)) {  // the table comes with top images
    const head = table.insertRow();
    ['node', 'attribution', 'label', 'top images', 'dashboard'].forEach(h => {
      const th = document.createElement('th'); th.textContent = h; head.appendChild(th); });
    data.nodes.forEach((n, i) => {
      const row = table.insertRow(); row.id = 'node-row-' + i;
      row.insertCell().textContent = n.id;
      row.insertCell().textContent = n.attribution.toPrecision(3);
      row.insertCell().textContent = n.label || '';
      const cell = row.insertCell();
      (n.images || []).forEach(src => { const im = document.createElement('img');
        im.src = src; im.alt = n.id; im.className = 'thumb'; cell.appendChild(im); });
      const link = row.insertCell();
      if (n.link) { const a = document.createElement('a'); a.href = n.link; a.textContent = 'open';
        a.target = '_blank'; link.appendChild(a); }
    });
  }
})();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.summary td { padding: 0 1em 0 0; }
#circuit-graph text { font-size: 12px; fill: #222; }
#circuit-graph text.hook { font-weight: bold; font-size: 13px; }
#circuit-graph circle.pos { fill: #3b6fd6; } #circuit-graph circle.neg { fill: #d64b3b; }
#circuit-graph circle.error { stroke: #888; stroke-width: 3; }
#circuit-graph path.edge { fill: none; opacity: 0.55; } path.pos { stroke: #3b6fd6; } path.neg { stroke: #d64b3b; }
#circuit-graph .node { cursor: pointer; }
#circuit-graph image.thumb, img.thumb { image-rendering: pixelated; }
img.thumb { width: 32px; height: 32px; margin-right: 2px; border: 1px solid #ccc; }
table#node-table td, table#node-table th { padding: 2px 8px; text-align: left; font-size: 12px; }
#tooltip { position: absolute; display: none; white-space: pre; background: #fff; border: 1px solid #999;
           padding: 4px 8px; font-size: 12px; pointer-events: none; }
"""


def _lookup(table: Links, hook: str, feature: Any) -> Optional[str]:
    if table is None or feature == "error":
        return None
    if callable(table):
        return table(hook, int(feature))
    per_hook = table.get(hook)
    if per_hook is None:
        return None
    value = per_hook.get(int(feature), per_hook.get(str(feature)))  # type: ignore[call-overload]
    return None if value is None else str(value)


def image_uri(image: Any) -> str:
    """A PNG ``data:`` URI for a uint8 array [H, W, 3] / [H, W], a PIL image or PNG bytes (a data: URI passes)."""
    if isinstance(image, str):
        if not image.startswith("data:image/"):
            raise ValueError("An image given as text must be a data: URI (data:image/png;base64,...); the page "
                             "fetches nothing.")
        return image
    if isinstance(image, (bytes, bytearray)):
        if not bytes(image[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError("Image bytes must be a PNG file's contents.")
        data = bytes(image)
    else:
        from PIL import Image  # Pillow: only needed when images are drawn

        if not isinstance(image, Image.Image):
            import numpy as np

            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise ValueError(f"Expected a uint8 image [H, W, 3] or [H, W]; got {array.dtype} {array.shape}.")
            image = Image.fromarray(array)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _node_images(table: Images, node: Mapping[str, Any]) -> Optional[list[str]]:
    if table is None or node["feature"] == "error":
        return None
    if callable(table):
        found = table(node["hook"], int(node["feature"]))
    elif node["id"] in table:
        found = table[node["id"]]
    else:
        per_hook = table.get(node["hook"]) or {}
        found = per_hook.get(int(node["feature"]), per_hook.get(str(node["feature"])))
    return None if found is None else [image_uri(im) for im in found]


def circuit_html(circuit: Any, *, labels: Links = None, dashboards: Links = None, images: Images = None,
                 title: str = "Circuit") -> str:
    """The page's HTML. ``labels`` / ``dashboards``: ``{hook: {feature: text / url}}`` or a function
    ``(hook, feature) -> text / url or None`` (e.g. the package's feature labels, dashboard file names).
    ``images``: each feature node's top images (see :data:`Images`), drawn under its label and listed in the
    node table."""
    data = circuit.to_dict()
    for node in data["nodes"]:
        node["label"] = _lookup(labels, node["hook"], node["feature"])
        node["link"] = _lookup(dashboards, node["hook"], node["feature"])
        node["images"] = _node_images(images, node)
    rows = [("nodes", len(data["nodes"])), ("edges", len(data["edges"])),
            ("clean metric", f"{circuit.clean_metric:.4g}"), ("corrupted metric", f"{circuit.corrupted_metric:.4g}"),
            ("node threshold", circuit.node_threshold), ("edge threshold", circuit.edge_threshold)]
    if circuit.faithfulness is not None:
        rows.append(("faithfulness", f"{circuit.faithfulness:.3f}"))
    if circuit.completeness is not None:
        rows.append(("completeness (complement's faithfulness)", f"{circuit.completeness:.3f}"))
    summary = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table class='summary' id='summary'>{summary}</table>"
        "<p>Columns: SAE hooks in the order they run. Node size: |attribution| (the estimated metric change when "
        "the node takes its corrupted value); blue raises, red lowers the metric; ringed: SAE error nodes. "
        "Hover for details; click a feature to open its dashboard.</p>"
        "<svg id='circuit-graph' xmlns='http://www.w3.org/2000/svg'></svg><div id='tooltip'></div>"
        "<table id='node-table'></table>"
        f"<script type='application/json' id='circuit-data'>{payload}</script>"
        f"<script>{_SCRIPT.replace('THUMB_PX', str(THUMB))}</script></body></html>\n"
    )


def write_circuit_html(circuit: Any, path: Union[str, Path], *, labels: Links = None, dashboards: Links = None,
                       images: Images = None, title: str = "Circuit") -> Path:
    """Write :func:`circuit_html` to ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, circuit_html(circuit, labels=labels, dashboards=dashboards, images=images, title=title))
    return path
