"""A small document model (sections of paragraphs, tables and figures) rendered to HTML and Markdown.

The report is built once as a `Document` and written twice, so index.html and report.md always say the same.
Text is plain; `backticks` mark code. The HTML page is self-contained: inline CSS, no scripts, images referenced
by paths relative to the page.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_CODE = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Cell:
    """A table cell.

    `sub` is a second, smaller line in HTML (appended after a space in Markdown); `title` becomes a tooltip in
    HTML; `css` a class (num, bytes, unavailable, sig, worse, frontier). With `span`, the same Cell object in
    consecutive rows of one column is drawn once with a rowspan in HTML (Markdown repeats it).
    """

    text: str
    title: str | None = None
    css: str | None = None
    sub: str | None = None
    span: bool = False
    md_text: str | None = None  # Markdown has no tooltips: text to print there instead of `text`


@dataclass
class Paragraph:
    text: str
    css: str | None = None


@dataclass
class Table:
    header: list[str | Cell]
    rows: list[list[str | Cell]]
    caption: str | None = None


@dataclass
class Figure:
    src: str  # relative to the page
    alt: str
    caption: str | None = None


@dataclass
class Details:
    """Preformatted text behind a summary line: collapsed in HTML (<details>), a fenced block in Markdown."""

    summary: str
    text: str
    lang: str = ""


Block = Paragraph | Table | Figure | Details


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> Block:
        self.blocks.append(block)
        return block


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)


def _cell(value: str | Cell) -> Cell:
    return value if isinstance(value, Cell) else Cell(value)


# ---------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d2430;
       margin: 0; background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 24px 64px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 2px; }
.subtitle { color: #5b6472; margin: 0 0 16px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e6eb; }
nav ol { columns: 2; margin: 8px 0 0; padding-left: 20px; }
nav a, a { color: #2358b8; text-decoration: none; }
p { margin: 8px 0; max-width: 100ch; }
.scroll { overflow-x: auto; margin: 10px 20px 16px 0; display: inline-block; vertical-align: top; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0 6px; }
th, td { border: 1px solid #dde1e7; padding: 4px 6px; vertical-align: top; }
th { background: #eef1f5; text-align: left; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.unavailable { color: #8a5a00; background: #fff8e6; font-style: italic; }
td.sig { background: #e8f5ea; }
td.worse { background: #fdecea; }
td.frontier { font-weight: 600; }
td .sub { color: #5b6472; font-size: 11px; }
td.unavailable { white-space: normal; min-width: 8em; max-width: 13em; text-align: left; }
td.bytes { text-decoration: underline dotted #9aa3af; }
[title] { cursor: help; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid #dde1e7; }
figcaption { color: #5b6472; font-size: 13px; margin-top: 4px; max-width: 100ch; }
code { background: #f0f2f5; padding: 0 3px; border-radius: 3px; font-size: 12.5px; }
details { margin: -12px 0 20px; max-width: 120ch; }
summary { color: #2358b8; cursor: pointer; font-size: 13px; }
pre { background: #f6f7f9; border: 1px solid #dde1e7; padding: 8px; font-size: 12px; overflow-x: auto;
      white-space: pre-wrap; }
th .sub { color: #5b6472; font-size: 11px; font-weight: normal; }
.note { color: #5b6472; }
""".strip()


def _inline_html(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _html_cell(tag: str, value: str | Cell, rowspan: int = 1) -> str:
    cell = _cell(value)
    attrs = f' rowspan="{rowspan}"' if rowspan > 1 else ""
    if cell.css:
        attrs += f' class="{html.escape(cell.css)}"'
    if cell.title:
        attrs += f' title="{html.escape(cell.title)}"'
    body = _inline_html(cell.text)
    if tag == "th":  # let long metric names break after underscores
        body = body.replace("_", "_<wbr>")
    if cell.sub:
        body += f'<br><span class="sub">{_inline_html(cell.sub)}</span>'
    return f"<{tag}{attrs}>{body}</{tag}>"


def _html_rows(rows: list[list[str | Cell]]) -> list[str]:
    """<tr> lines; a spanning Cell repeated (as the same object) down a column becomes one rowspan cell."""
    spans: list[list[int]] = [[1] * len(row) for row in rows]  # 0 = covered by a cell above
    for r in range(len(rows) - 1, 0, -1):
        for c, value in enumerate(rows[r]):
            above = rows[r - 1][c] if c < len(rows[r - 1]) else None
            if isinstance(value, Cell) and value.span and above is value:
                spans[r - 1][c] += spans[r][c]
                spans[r][c] = 0
    return [
        "<tr>" + "".join(_html_cell("td", v, n) for v, n in zip(row, spans[r], strict=True) if n) + "</tr>"
        for r, row in enumerate(rows)
    ]


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        css = f' class="{block.css}"' if block.css else ""
        return f"<p{css}>{_inline_html(block.text)}</p>"
    if isinstance(block, Details):
        return (
            f"<details><summary>{_inline_html(block.summary)}</summary>"
            f"<pre>{html.escape(block.text)}</pre></details>"
        )
    if isinstance(block, Figure):
        caption = f"<figcaption>{_inline_html(block.caption)}</figcaption>" if block.caption else ""
        return (
            f'<figure><img src="{html.escape(block.src)}" alt="{html.escape(block.alt)}">{caption}</figure>'
        )
    lines = ['<div class="scroll"><table>']
    if block.caption:
        lines.append(f"<caption>{_inline_html(block.caption)}</caption>")
    lines.append("<thead><tr>" + "".join(_html_cell("th", h) for h in block.header) + "</tr></thead><tbody>")
    lines.extend(_html_rows(block.rows))
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def render_html(doc: Document) -> str:
    """The whole page as one string (UTF-8, inline CSS)."""
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in doc.sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body><main>",
        f"<h1>{html.escape(doc.title)}</h1>",
        f'<p class="subtitle">{_inline_html(doc.subtitle)}</p>',
        f"<nav><strong>Contents</strong><ol>{toc}</ol></nav>",
    ]
    for section in doc.sections:
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        parts.extend(_html_block(b) for b in section.blocks)
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- Markdown


def _md_cell(value: str | Cell) -> str:
    cell = _cell(value)
    base = cell.md_text if cell.md_text is not None else cell.text
    text = f"{base} {cell.sub}" if cell.sub else base
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Details):
        return f"<details><summary>{html.escape(block.summary)}</summary>\n\n```{block.lang}\n{block.text}\n```\n\n</details>"
    if isinstance(block, Figure):
        image = f"![{block.alt}]({block.src})"
        return f"{image}\n\n{block.caption}" if block.caption else image
    lines = [f"**{block.caption}**", ""] if block.caption else []
    lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
    lines.append("|" + "---|" * len(block.header))
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
    return "\n".join(lines)


def render_markdown(doc: Document) -> str:
    parts = [f"# {doc.title}", "", doc.subtitle, ""]
    for section in doc.sections:
        parts += [f"## {section.title}", ""]
        for block in section.blocks:
            parts += [_md_block(block), ""]
    return "\n".join(parts)
