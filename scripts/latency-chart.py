#!/usr/bin/env python3
"""Draws docs/latency.svg from docs/latency.csv (no dependencies beyond Python 3).

docs/latency.csv holds one line per `scripts/bench-ingest.sh --fauxqs --latency-ms N` run:
    latency_ms,adaptive_msg_s,fixed4_msg_s,ceiling_msg_s
The chart plots messages/s against the added round trip, adaptive against the old fixed four
receivers, with the receive+delete ceiling (no database) for scale.
"""
import csv
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent
rows = [r for r in csv.DictReader(open(root / "docs/latency.csv"))]
xs = [float(r["latency_ms"]) for r in rows]
series = [
    ("ceiling (receive+delete, 32 receivers)", "ceiling_msg_s", "#999999"),
    ("loader ingest, adaptive (default)", "adaptive_msg_s", "#1f77b4"),
    ("loader ingest --receivers 4 (fixed)", "fixed4_msg_s", "#d62728"),
]
w, h, left, right, top, bottom = 640, 360, 70, 20, 20, 90
ymax = max(float(r[k]) for r in rows for _, k, _ in series) * 1.1
xmax = max(xs) or 1.0
px = lambda x: left + (w - left - right) * x / xmax
py = lambda y: top + (h - top - bottom) * (1 - y / ymax)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
       f'<rect width="{w}" height="{h}" fill="white"/>']
for i in range(6):
    y = ymax * i / 5
    out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
for x in xs:
    out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:g}</text>')
out.append(f'<text x="{(left + w - right) / 2}" y="{h - bottom + 34}" text-anchor="middle">'
           'added round trip per SQS call (ms)</text>')
out.append(f'<text x="14" y="{top + (h - top - bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 14 {top + (h - top - bottom) / 2})">messages/s</text>')
for n, (label, key, colour) in enumerate(series):
    points = " ".join(f"{px(x):.1f},{py(float(r[key])):.1f}" for x, r in zip(xs, rows))
    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
    for x, r in zip(xs, rows):
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(float(r[key])):.1f}" r="3" fill="{colour}"/>')
    ly = h - bottom + 50 + 14 * n
    out.append(f'<line x1="{left}" x2="{left + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
    out.append(f'<text x="{left + 30}" y="{ly}">{label}</text>')
out.append("</svg>")
(root / "docs/latency.svg").write_text("\n".join(out) + "\n")
print("wrote docs/latency.svg")
