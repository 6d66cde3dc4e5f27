"""A report as JSON, CSV, printable HTML (inline SVG charts, no script, nothing fetched) and PDF.

PDF: the HTML is printed by headless Chromium (`--print-to-pdf`), Debian's `/usr/bin/chromium`.
One layout (the HTML, with print CSS) serves screen, paper and PDF, so the PDF is exactly what the
page shows; CI already installs that Chromium for the HMI's browser tests, and the station needs no
extra Python package for it. The alternatives were worse: WeasyPrint needs Pango/cairo system
libraries; ReportLab or fpdf2 would need a second, hand-made layout of every table and chart.
Without Chromium, `kozan report` still writes JSON, CSV and HTML and says how to get the PDF.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PALETTE = ["#1f5f99", "#d9822b", "#3c8d40", "#b03a48", "#6b4c9a", "#2a9d8f", "#8c6d31", "#5c5c5c",
           "#c06c84", "#4a7fb0"]


def to_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def to_csv(rep: dict[str, Any]) -> str:
    """One row per (class, delivered bin): items, estimated mass, contained metal per metal (g)."""
    metals = [m["metal"] for m in rep["metals"]]
    names = {str(b["bin"]): b["name"] for b in rep["per_bin"]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["report", "period", "class", "bin", "bin_name", "items", "mass_kg_est"]
               + [f"{m}_g_est" for m in metals])
    label = rep["period"]["label"]
    for c in rep["per_class"]:
        for b, n in c["bins"].items():
            share = n / c["items"] if c["items"] else 0
            row = [rep["report"], label, c["class"], b, names.get(b, ""), n, round(c["mass_kg"] * share, 3)]
            for m in rep["metals"]:
                row.append(round(m["by_class_g"].get(c["class"], 0.0) * share, 4))
            w.writerow(row)
    w.writerow([rep["report"], label, "TOTAL", "", "", rep["totals"]["items"], rep["totals"]["mass_kg"]]
               + [m["contained_g"] for m in rep["metals"]])
    return buf.getvalue()


# ---- SVG charts ----------------------------------------------------------------------------------
def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


LEGEND_ROW_H = 16
LEGEND_CHAR_W = 7.0      # an upper bound for an 11-px sans-serif character (.chart .lg)


def legend_entry_width(name: str) -> float:
    """Swatch, gap and text of one legend entry, in SVG px."""
    return 14 + LEGEND_CHAR_W * len(name)


def _legend_layout(names: list[str], left: int, width: int) -> list[tuple[int, int]]:
    """(x, row) for each legend entry: left to right from `left`, a new row when the next would overflow."""
    out: list[tuple[int, int]] = []
    x, row = left, 0
    for name in names:
        w = legend_entry_width(name)
        if x > left and x + w > width - 4:
            x, row = left, row + 1
        if x == left and x + w > width - 4:     # too long even for a row of its own from `left`: start at 0
            out.append((max(0, int(width - 4 - w)), row))
            x, row = left, row + 1
            continue
        out.append((x, row))
        x += int(w) + 16
    return out


def bar_chart(title: str, rows: list[tuple[str, list[tuple[str, float]]]], unit: str, width: int = 640,
              legend: list[str] | None = None, fmt: str = "{:,.0f}") -> str:
    """Horizontal bars, each row stacked from (segment name, value) pairs.

    The legend starts under the bars' left edge and wraps onto as many rows as it needs, so every
    series keeps its entry inside the chart's width (the SVG grows taller, never wider).
    """
    bar_h, gap, left, right, top = 22, 8, 170, 90, 30
    legend_at = _legend_layout(legend or [], left, width)
    h = top + len(rows) * (bar_h + gap) + (LEGEND_ROW_H * (1 + max(r for _, r in legend_at)) + 6 if legend_at else 6)
    vmax = max([sum(v for _, v in segs) for _, segs in rows] + [1e-9])
    scale = (width - left - right) / vmax
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(legend or [])}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {h}" width="{width}" '
           f'height="{h}" role="img" aria-label="{_e(title)}">',
           f'<text x="0" y="16" class="ct">{_e(title)}</text>']
    for i, (label, segs) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" class="cl">{_e(label)}</text>')
        x = float(left)
        for j, (seg, v) in enumerate(segs):
            wv = v * scale
            col = colours.get(seg, PALETTE[j % len(PALETTE)])
            if wv > 0:
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{wv:.1f}" height="{bar_h}" fill="{col}">'
                           f'<title>{_e(seg)}: {_e(fmt.format(v))} {_e(unit)}</title></rect>')
            x += wv
        total = sum(v for _, v in segs)
        out.append(f'<text x="{x + 6:.1f}" y="{y + bar_h * 0.7:.1f}" class="cv">{_e(fmt.format(total))} {_e(unit)}</text>')
    y0 = top + len(rows) * (bar_h + gap) + 12
    for name, (x, r) in zip(legend or [], legend_at):
        y = y0 + r * LEGEND_ROW_H
        out.append(f'<rect x="{x}" y="{y - 10}" width="10" height="10" fill="{colours[name]}"/>'
                   f'<text x="{x + 14}" y="{y}" class="lg">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _fmt_g(g: float) -> str:
    if g >= 10000:
        return f"{g / 1000:,.1f} kg"
    if g >= 10:
        return f"{g:,.0f} g"
    return f"{g:,.2f} g"


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
@page { size: A4; margin: 14mm 12mm; }
body { font-family: "Noto Sans", "DejaVu Sans", Arial, sans-serif; font-size: 10.5pt; color: #1b1b1b; margin: 0 auto;
       max-width: 190mm; }
h1 { font-size: 17pt; margin: 0 0 2mm; } h2 { font-size: 12.5pt; margin: 6mm 0 2mm; border-bottom: 1px solid #999; }
.meta { color: #444; margin: 0 0 3mm; }
table { border-collapse: collapse; width: 100%; margin: 1mm 0 3mm; page-break-inside: avoid; }
th, td { border: 1px solid #bbb; padding: 1.2mm 2mm; text-align: left; vertical-align: top; }
th { background: #eef1f5; } td.n, th.n { text-align: right; }
.kpis { display: flex; gap: 3mm; flex-wrap: wrap; margin: 2mm 0; }
.kpi { border: 1px solid #bbb; border-radius: 2mm; padding: 2mm 3mm; min-width: 28mm; }
.kpi b { display: block; font-size: 14pt; }
.hash { font-family: "DejaVu Sans Mono", monospace; font-size: 9.5pt; word-break: break-all; }
.ok { color: #1d6b2a; font-weight: bold; } .bad { color: #a11; font-weight: bold; }
.chart { max-width: 100%; height: auto; page-break-inside: avoid; display: block; margin: 2mm 0; }
.chart .ct { font-weight: bold; font-size: 12px; } .chart .cl, .chart .cv, .chart .lg { font-size: 11px; }
.note { color: #444; font-size: 9pt; } section { page-break-inside: auto; }
table.sources { font-size: 9pt; } ol.refs { font-size: 8.5pt; color: #444; padding-left: 0; list-style: none; margin: 1mm 0 3mm; }
ol.refs li { margin: 0 0 1mm; }
"""


def _sources_html(src: dict[str, Any] | None) -> str:
    """Each reported class's metal contents with the source they cite, then the table's references."""
    if not src:
        return ""
    rows = [[_e(c), "; ".join(f"{_e(', '.join(g['metals']))}: {_e(g['source'])}" for g in groups)]
            for c, groups in src.get("per_class", {}).items() if groups]
    out = _table(["class", "metal contents (g/t): source"], rows, "sources") if rows else ""
    refs = src.get("references") or {}
    if refs:
        out += ('<ol class="refs">' + "".join(f"<li><b>[{_e(k)}]</b> {_e(v)}</li>" for k, v in refs.items())
                + "</ol>")
    return out


def to_html(rep: dict[str, Any]) -> str:
    t = rep["totals"]
    p = rep["period"]
    parts = [f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(rep["title"])}</title>'
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(rep['title'])}</h1>",
             f'<p class="meta">Station {_e(rep["station"])} · period {_e(p["from"] or "–")} to {_e(p["to"] or "open")}'
             f" (times UTC; plant time zone {_e(p['timezone'])}) · generated {_e(rep['generated_at'])}</p>"]
    lot = rep.get("lot")
    if lot:
        v = lot["verification"]
        status = ('<span class="ok">chain verified</span>' if v["ok"] else
                  '<span class="bad">CHAIN BROKEN</span>: ' + "; ".join(_e(x) for x in v["problems"][:5]))
        parts.append("<h2>Lot</h2>" + _table(["", ""], [
            ["Lot number", f"<b>{_e(lot['lot_number'])}</b>"], ["Origin country", _e(lot["origin_country"])],
            ["Supplier", _e(lot["supplier"])], ["Consignment reference", _e(lot["consignment_ref"] or "–")],
            ["Basel notification", _e(lot["basel_ref"] or "–")],
            ["Opened", f"{_e(lot['opened_at'])} by {_e(lot['opened_by'])}"],
            ["Closed", f"{_e(lot['closed_at'] or 'still open')}" + (f" by {_e(lot['closed_by'])}" if lot["closed_by"] else "")],
            ["Records on the chain", f"{lot['records']} ({status})"],
            ["Chain head (SHA-256)", f'<span class="hash">{_e(lot["head_hash"])}</span>'],
            ["Verify with", f'<span class="hash">kozan report verify {_e(lot["lot_number"])} --head {_e(lot["head_hash"])}</span>'],
        ]))
        if lot["sealed_head"] and lot["sealed_head"] != lot["head_hash"]:
            parts.append(f'<p class="note">Sealed at close with {lot["sealed_records"]} records (head '
                         f'<span class="hash">{_e(lot["sealed_head"])}</span>); '
                         f'{lot["records"] - lot["sealed_records"]} late diverter outcome(s) were chained after.</p>')
    parts.append('<h2>Summary</h2><div class="kpis">' + "".join(
        f'<div class="kpi"><b>{v}</b>{_e(k)}</div>' for k, v in (
            ("items", f"{t['items']:,}"), ("estimated mass", f"{t['mass_kg']:,.1f} kg"),
            ("sorted to a bin", f"{t['sorted']:,}"), ("manual path", f"{t['manual']:,}"),
            ("missed / failed", f"{t['missed_or_failed']:,}"),
            ("unconfirmed firings", f"{t['unconfirmed']:,}"))) + "</div>")

    classes = [c["class"] for c in rep["per_class"]]
    bins = [b for b in rep["per_bin"] if b["items"] or b["bin"] != 0]
    parts.append(bar_chart("Items per bin, by class", [
        (f"{b['bin']} {b['name']}", [(c, float(b["classes"].get(c, 0))) for c in classes]) for b in bins],
        "items", legend=classes))
    parts.append(bar_chart("Estimated mass per class", [(c["class"], [(c["class"], c["mass_kg"])])
                                                       for c in rep["per_class"]], "kg", fmt="{:,.1f}"))
    prec = [m for m in rep["metals"] if m["metal"] in ("Au", "Ag", "Pd")]
    base = [m for m in rep["metals"] if m["metal"] not in ("Au", "Ag", "Pd")]
    if prec:
        parts.append(bar_chart("Estimated recoverable precious metals", [
            (m["metal"], [(m["metal"], m["recoverable_g"])]) for m in prec], "g", fmt="{:,.2f}"))
    if base:
        parts.append(bar_chart("Estimated recoverable base and battery metals", [
            (m["metal"], [(m["metal"], m["recoverable_g"] / 1000)]) for m in base], "kg", fmt="{:,.2f}"))

    parts.append("<h2>Items per class and bin</h2>")
    bin_ids = [str(b["bin"]) for b in rep["per_bin"]]
    parts.append(_table(["class"] + [f"bin {b}" for b in bin_ids] + ["items", "mass each (g)", "est. mass (kg)", "range (kg)"], [
        [_e(c["class"])] + [f'<span class="n">{c["bins"].get(b, 0)}</span>' for b in bin_ids]
        + [c["items"], f"{c['mass_g_each']:g}", f"{c['mass_kg']:,.2f}",
           f"{c['mass_kg_range'][0]:,.2f}–{c['mass_kg_range'][1]:,.2f}"] for c in rep["per_class"]]))

    parts.append("<h2>Bins and purity indicators</h2>")
    parts.append(_table(["bin", "items", "est. mass (kg)", "mean conf.", "min conf.", "expected foreign share",
                         "diverter confirmed", "classes"], [
        [f"{b['bin']} {_e(b['name'])}", b["items"], f"{b['mass_kg']:,.2f}",
         "–" if b["mean_confidence"] is None else f"{b['mean_confidence']:.3f}",
         "–" if b["min_confidence"] is None else f"{b['min_confidence']:.3f}",
         "–" if b["expected_foreign_share"] is None else f"{b['expected_foreign_share']:.2%}",
         "–" if b.get("confirmed_share") is None else f"{b['confirmed']}/{b['decided']} ({b['confirmed_share']:.1%})",
         _e(", ".join(f"{k} {v}" for k, v in b["classes"].items()))] for b in rep["per_bin"]]))
    parts.append('<p class="note">Expected foreign share: mean over the bin of 1 − the winning class\'s share of the '
                 "item's votes — a model-based indicator, not a measured purity.</p>")

    parts.append("<h2>Estimated metal content</h2>")
    parts.append(_table(["metal", "contained (est.)", "range", "yield", "recoverable (est.)", "by class"], [
        [m["metal"], _fmt_g(m["contained_g"]), f"{_fmt_g(m['range_g'][0])} – {_fmt_g(m['range_g'][1])}",
         f"{m['yield']:.0%}", f"<b>{_fmt_g(m['recoverable_g'])}</b>",
         _e(", ".join(f"{k} {_fmt_g(v)}" for k, v in m["by_class_g"].items()))] for m in rep["metals"]]))

    parts.append("<h2>Manual path and missed items</h2>")
    rows = [[f"manual: {_e(k)}", v] for k, v in rep["manual"]["by_reason"].items()]
    rows += [[f"missed / failed: {_e(k)}", v] for k, v in rep["missed"]["by_outcome"].items()]
    parts.append(_table(["why", "items"], rows or [["none", 0]]))
    parts.append("<h2>Alarms</h2>")
    parts.append(_table(["alarm", "severity", "raised", "first", "last", "last message"], [
        [_e(a["code"]), _e(a["severity"]), a["count"], _e(a["first_at"]), _e(a["last_at"]), _e(a["last_message"])]
        for a in rep["alarms"]]) if rep["alarms"] else "<p>No alarms.</p>")
    parts.append("<h2>Models and runs</h2>")
    parts.append(_table(["model version", "items"], [[_e(m["version"]), m["items"]] for m in rep["model_versions"]]))
    parts.append(_table(["run", "mode", "started", "ended", "model"], [
        [r["id"], _e(r["mode"]), _e(r["started_at"]), _e(r["ended_at"] or "running"), _e(r["model_version"])]
        for r in rep["runs"]]))
    comp = rep["composition"]
    parts.append("<h2>Basis of the estimates</h2>"
                 f'<p class="note">Composition table {_e(comp["path"])}, SHA-256 '
                 f'<span class="hash">{_e(comp["sha256"])}</span>.</p>' + _sources_html(comp.get("sources"))
                 + "".join(f'<p class="note">{_e(n)}</p>' for n in rep["notes"]))
    parts.append("</body></html>\n")
    return "".join(parts)


class PdfUnavailable(RuntimeError):
    pass


def html_to_pdf(html_path: Path, pdf_path: Path, chromium: str = "/usr/bin/chromium", timeout_s: float = 180) -> None:
    exe = chromium if os.path.isabs(chromium) else shutil.which(chromium)
    if not exe or not os.access(exe, os.X_OK):
        raise PdfUnavailable(f"no Chromium at {chromium}: install Debian's chromium (apt-get install chromium) or set "
                             "records.reports.chromium; the HTML report prints to PDF from any browser too")
    with tempfile.TemporaryDirectory(prefix="kozan-pdf-") as prof:
        cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={prof}", "--no-pdf-header-footer", f"--print-to-pdf={pdf_path}",
               html_path.resolve().as_uri()]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PdfUnavailable(f"Chromium did not print the PDF within {timeout_s:.0f} s") from None
    if r.returncode != 0 or not pdf_path.exists() or pdf_path.stat().st_size == 0:
        raise PdfUnavailable(f"Chromium failed to print the PDF (exit {r.returncode}): {r.stderr.strip()[-400:]}")


def write_all(rep: dict[str, Any], out_dir: Path, stem: str, formats: list[str],
              chromium: str = "/usr/bin/chromium") -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for f in formats:
        p = out_dir / f"{stem}.{f}"
        if f == "json":
            p.write_text(to_json(rep), encoding="utf-8")
        elif f == "csv":
            p.write_text(to_csv(rep), encoding="utf-8")
        elif f == "html":
            p.write_text(to_html(rep), encoding="utf-8")
        elif f == "pdf":
            h = out_dir / f"{stem}.html"
            if "html" not in written:
                h.write_text(to_html(rep), encoding="utf-8")
                written["html"] = str(h)
            html_to_pdf(h, p, chromium)
        else:
            raise ValueError(f"unknown format {f!r}: json, csv, html, pdf")
        written[f] = str(p)
    return written
