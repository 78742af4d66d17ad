"""The report document: one HTML page that needs nothing else, and the same content as Markdown."""
import base64
import io
import re

from PIL import Image

from segpipe.report import Figure, Heading, Table, Text, figures, to_html, to_markdown


def png_bytes(size=(6, 4)):
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


BLOCKS = [Heading("Summary"), Text("a < b & c"), Table(["", "Dice"], [["ensemble", 0.81234], ["x|y", None]]),
          Figure("f.png", png_bytes(), "a figure")]


def test_html_embeds_every_figure_and_fetches_nothing():
    page = to_html("T", BLOCKS)
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == BLOCKS[3].png
    assert "http" not in page and "<script" not in page and "<link" not in page


def test_html_escapes_text_and_formats_numbers():
    page = to_html("T", BLOCKS)
    assert "<p>a &lt; b &amp; c</p>" in page
    assert "<td>0.812</td>" in page and "<td>-</td>" in page
    assert page.index("<h1>T</h1>") < page.index("<h2>Summary</h2>") < page.index("<table>")


def test_markdown_has_the_same_table_and_links_the_figure_file():
    text = to_markdown("T", BLOCKS, "figures")
    assert "| ensemble | 0.812 |" in text and "| x\\|y | - |" in text
    assert "![a figure](figures/f.png)" in text
    assert figures(BLOCKS) == {"f.png": BLOCKS[3].png}
