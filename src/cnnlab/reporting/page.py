"""The HTML around the sections: one file, figures embedded as data URIs, CSS and the parallel-coordinates script
inline, so it opens from file:// with no network and can be handed in as it is."""

from __future__ import annotations

import base64
import hashlib
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def figure(path: Path | None, caption: str, width: int | None = None) -> str:
    """An embedded PNG with its caption (at most `width` CSS pixels wide); '' when the file is missing."""
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="max-width:min({width}px,100%)"' if width else ""
    return (f'<figure{style}><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table (escaped cells) in a horizontally scrolling box, so a wide one never widens the page."""
    def cell(tag: str, i: int, v: Any) -> str:
        return f"<{tag}{' class=num' if i in numeric else ''}>{esc(v)}</{tag}>"

    return ("<div class=scroll><table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
            + "</table></div>")


def claims_list(claims: Sequence[str]) -> str:
    """Claims drawn from the numbers, one escaped list item each ('' for none)."""
    return "<ul class=claims>" + "".join(f"<li>{esc(c)}</li>" for c in claims) + "</ul>" if claims else ""


def markdown_table(text: str) -> str:
    """A Markdown table (as compare.md holds one) as an HTML table."""
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return table(cells[0], cells[1:]) if cells else ""


def missing(what: str, command: str) -> str:
    return f"<p class=missing>{what} is not in the inputs: <code>{esc(command)}</code> produces it.</p>"


def source(*parts: str) -> str:
    """Where the numbers above came from (run folder, checkpoint, command)."""
    return "<p class=source>" + "<br>".join(parts) + "</p>"


def parcoords(dims: list[dict[str, Any]], rows: list[dict[str, Any]], metric: str, goal: str) -> str:
    """The interactive parallel-coordinates block (its data inline as JSON; parcoords.js draws it)."""
    data = json.dumps({"dims": dims, "rows": rows, "metric": metric, "goal": goal}).replace("</", "<\\/")
    return ("<div class=parcoords><p class=pc-count></p><div class=pc-svg></div>"
            f'<script type="application/json">{data}</script><div class=pc-table></div></div>')


def content_security_policy(script: str) -> str:
    """The page's policy: its one inline script runs (allowed by its SHA-256, so a script that markup from a run or
    a sweep might smuggle in does not), its own inline CSS applies, images come only from data: URIs, and nothing
    is fetched, submitted or framed."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def page(title: str, sections: list[tuple[str, str, str]], header: str) -> str:
    """The whole document: a table of contents, then each (anchor, heading, body) section."""
    script = asset("parcoords.js")
    toc = "".join(f'<li><a href="#{a}">{esc(h)}</a></li>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{esc(h)}</h2>{b}</section>' for a, h, b in sections)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(content_security_policy(script))}">'
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{asset('report.css')}</style></head><body><main>"
            f"<h1>{esc(title)}</h1>{header}<nav><ol>{toc}</ol></nav>{body}</main>"
            f"<script>{script}</script></body></html>\n")
