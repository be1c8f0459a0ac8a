#!/usr/bin/env python3
"""Scrapes a running loader's metrics endpoint once a second, then draws what the Grafana
dashboard (deploy/grafana/loader-dashboard.json) shows, from the same metrics, as one SVG:

    scripts/metrics-chart.py ADDR SECONDS OUT.svg

Panels: throughput by stage (rates of the counters), backlog (queue gauges and pending rows),
staging latency (p50 and p95 over 5 s windows of the histogram buckets, as
histogram_quantile would) and rejects by reason. No dependencies beyond Python 3.
scripts/metrics-picture.sh drives a loader run under a changing load and calls it.
"""
import re
import sys
import time
import urllib.request

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def scrape(addr):
    """One scrape: {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            samples[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return samples


def total(s, name, labels=""):
    """Sum of a family's samples whose labels contain `labels`."""
    return sum(v for (n, l), v in s.items() if n == name and labels in l)


def label_values(scrapes, name, label):
    found = set()
    for s in scrapes:
        for (n, l) in s:
            m = re.search(label + r'="([^"]*)"', l)
            if n == name and m:
                found.add(m.group(1))
    return sorted(found)


def rate(scrapes, times, f):
    return [max(f(b) - f(a), 0) / (tb - ta)
            for a, b, ta, tb in zip(scrapes, scrapes[1:], times, times[1:])]


def quantile(scrapes, q, window=5):
    """histogram_quantile(q, increase(loader_staging_seconds_bucket[window s])), in ms."""
    out = []
    for i in range(1, len(scrapes)):
        a, b = scrapes[max(i - window, 0)], scrapes[i]
        buckets = sorted(
            (float(re.search(r'le="([^"]*)"', l).group(1)), v - a.get((n, l), 0.0))
            for (n, l), v in b.items() if n == "loader_staging_seconds_bucket")
        count = buckets[-1][1] if buckets else 0
        if count <= 0:
            out.append(None)
            continue
        rank, lower, below = q * count, 0.0, 0.0
        value = None
        for le, cum in buckets:
            if cum >= rank:
                value = le if le == float("inf") else lower + (le - lower) * (rank - below) / max(cum - below, 1e-9)
                break
            lower, below = le, cum
        out.append(None if value in (None, float("inf")) else value * 1000)
    return out


COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#7f7f7f"]


def panel(x0, y0, w, h, title, xs, series, unit):
    """A line chart at (x0, y0): series is [(label, [y or None])]."""
    left, right, top, bottom = 55, 10, 24, 20 + 14 * ((len(series) + 1) // 2)
    ys = [y for _, values in series for y in values if y is not None]
    ymax = (max(ys) if ys else 1) * 1.1 or 1
    xmax = max(xs) or 1
    px = lambda x: x0 + left + (w - left - right) * x / xmax
    py = lambda y: y0 + top + (h - top - bottom) * (1 - y / ymax)
    out = [f'<text x="{x0 + left}" y="{y0 + 16}"><tspan font-weight="bold">{title}</tspan> ({unit})</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<line x1="{x0 + left}" x2="{x0 + w - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 + left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
    out.append(f'<text x="{x0 + w - right}" y="{py(0) + 14:.1f}" text-anchor="end">{xmax:.0f} s</text>')
    for n, (label, values) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, values) if y is not None)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        lx = x0 + left + (n % 2) * (w - left - right) / 2
        ly = y0 + h - bottom + 30 + 14 * (n // 2)
        out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 22}" y="{ly}">{label}</text>')
    return out


def main():
    addr, seconds, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    scrapes, times, start = [], [], time.time()
    while time.time() - start < seconds:
        try:
            scrapes.append(scrape(addr))
            times.append(time.time() - start)
        except OSError:
            pass  # not up yet, or gone
        time.sleep(1)
    xs = times[1:]
    stages = [("received", "loader_messages_received_total"), ("staged", "loader_messages_staged_total"),
              ("deleted", "loader_messages_deleted_total"), ("loaded", "loader_rows_loaded_total"),
              ("rejected", "loader_rows_rejected_total")]
    throughput = [(label, rate(scrapes, times, lambda s, n=name: total(s, n))) for label, name in stages]
    backlog = [(f"queue {state}", [total(s, "loader_queue_messages", f'state="{state}"') for s in scrapes[1:]])
               for state in ("visible", "in_flight")]
    backlog.append(("pending rows", [total(s, "loader_pending_rows") for s in scrapes[1:]]))
    latency = [("p50", quantile(scrapes, 0.5)), ("p95", quantile(scrapes, 0.95))]
    reasons = [(reason, rate(scrapes, times, lambda s, r=reason: total(s, "loader_rows_rejected_total", f'reason="{r}"')))
               for reason in label_values(scrapes, "loader_rows_rejected_total", "reason")]
    w, h = 480, 260
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{2 * h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{2 * w}" height="{2 * h}" fill="white"/>']
    out += panel(0, 0, w, h, "Throughput by stage", xs, throughput, "per s")
    out += panel(w, 0, w, h, "Backlog", xs, backlog, "messages / rows")
    out += panel(0, h, w, h, "Staging statement latency (5 s windows)", xs, latency, "ms")
    out += panel(w, h, w, h, "Rejects by reason", xs, reasons, "per s")
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path} from {len(scrapes)} scrapes")


if __name__ == "__main__":
    main()
