"""Shared parts of the audit pages: escaping, tables, and the page shell with its inline CSS (no script)."""

from __future__ import annotations

import html


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:"DejaVu Sans",Verdana,sans-serif;margin:0 auto;max-width:1280px;padding:0 24px 48px;color:#222}
h1{font-size:22px;margin:20px 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
h3{font-size:15px}h4{font-size:13px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f2f2f2}.num{font-variant-numeric:tabular-nums}td:has(.num){text-align:right}
img.plot{max-width:100%;display:block;margin:8px 0}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:4px;background:#fafafa}figure img{display:block;max-width:420px}
figcaption{font-size:11px;color:#555;margin-top:4px}.na{color:#a33;font-style:italic}.small{font-size:11px;color:#666}
nav a{margin-right:12px;font-size:13px}code{font-size:11px}pre{font-size:11px;background:#f6f6f6;padding:8px;overflow:auto}
.added{color:#1a7f37}.dropped{color:#b42318}.rescored{color:#9a6700}
"""


def _page(title: str, nav: list[tuple[str, str]], sections: list[tuple[str, str, str]]) -> str:
    links = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{s}</section>' for a, t, s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1><nav>{links}</nav>{body}</body></html>\n"
    )
