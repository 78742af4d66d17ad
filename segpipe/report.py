"""A small document model (headings, paragraphs, tables, figures) written as one self-contained HTML
page (figures embedded as base64 PNG, no outside file or script) and as Markdown beside it (figures
as files in a folder next to it, which Markdown viewers show).

The evaluation report is built once as blocks (segpipe.evaluate_report) and written both ways, so
the two never disagree.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Figure:
    name: str  # file name (PNG) in the Markdown report's figure folder
    png: bytes
    caption: str


Block = Heading | Text | Table | Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def cell(value: Any) -> str:
    """A table cell as text: floats to 3 decimals, None as a dash."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """One HTML page holding everything: nothing is fetched when it is opened."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
             f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>\n"
                           for row in block.rows)
            parts.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>")
        else:
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(block.caption)}\">"
                         f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def to_markdown(title: str, blocks: Sequence[Block], figure_dir: str) -> str:
    """The same document as Markdown; figures are linked as `<figure_dir>/<name>`."""
    parts = [f"# {title}"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(block.text)
        elif isinstance(block, Table):
            rows = [list(block.columns), ["---"] * len(block.columns), *([cell(v) for v in r] for r in block.rows)]
            parts.append("\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows))
        else:
            parts.append(f"![{block.caption}]({figure_dir}/{block.name})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


def figures(blocks: Sequence[Block]) -> dict[str, bytes]:
    """The PNG files the Markdown report links, by name."""
    return {b.name: b.png for b in blocks if isinstance(b, Figure)}
