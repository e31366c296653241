"""The document model renders the same content as HTML and Markdown."""

from __future__ import annotations

from ditq.report.document import (
    Cell,
    Document,
    Figure,
    Paragraph,
    Section,
    Table,
    render_html,
    render_markdown,
)


def _doc():
    shared = Cell("unavailable: no weights", css="unavailable", span=True)
    table = Table(
        ["name", Cell("a_b ↑", title="higher is better")],
        [["x<y", shared], ["p|q", shared], ["z", Cell("1.5", sub="[1, 2]", css="num")]],
        caption="cap",
    )
    return Document(
        "T & co",
        "sub `code`",
        [Section("S1", "s1", [Paragraph("see `x`"), table, Figure("f.png", "alt", "fig")])],
    )


def test_render_html_escapes_and_merges_spanning_cells():
    page = render_html(_doc())
    assert "T &amp; co" in page and "x&lt;y" in page
    assert "<code>code</code>" in page
    assert page.count("unavailable: no weights") == 1  # one cell with rowspan=2
    assert 'rowspan="2"' in page
    assert '<span class="sub">[1, 2]</span>' in page
    assert 'title="higher is better"' in page
    assert '<img src="f.png" alt="alt">' in page
    assert "<script" not in page and "<link" not in page  # self-contained


def test_render_markdown_tables_and_escaping():
    md = render_markdown(_doc())
    assert "## S1" in md
    assert "| p\\|q | unavailable: no weights |" in md  # repeated, pipes escaped
    assert "| z | 1.5 [1, 2] |" in md
    assert "![alt](f.png)" in md
