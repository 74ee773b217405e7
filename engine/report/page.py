"""The report's building blocks (tables, figures, image galleries, sections) and the one HTML page they
render to: a Jinja2 template with its CSS inline and every image a base64 data URI, so the page opens
from disk with no server and no network."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def cell(value) -> str:
    """A table cell as text: integers with thousands separators, floats to three decimals, NaN as '–'."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:,.3f}"
    return str(value)


@dataclass
class Table:
    """A table of already computed aggregates (never a table's raw rows)."""

    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""
    kind: str = "table"

    @property
    def cells(self) -> list[list[tuple[str, str]]]:
        """Each cell's text and CSS class: numbers right-aligned, long text wrapping."""
        out = []
        for row in self.rows:
            texts = [cell(v) for v in row]
            out.append([(t, "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else ("text" if len(t) > 40 else ""))
                        for v, t in zip(row, texts)])
        return out


@dataclass
class Figure:
    """A PNG written next to the page (``file``) and inlined into it (``data_uri``)."""

    title: str
    file: str
    data_uri: str
    note: str = ""
    kind: str = "figure"


@dataclass
class Gallery:
    """Thumbnails with a heading and a text each (caption examples)."""

    title: str
    items: list[dict]  # {"data_uri", "file", "heading", "text"}
    note: str = ""
    kind: str = "gallery"


@dataclass
class Note:
    text: str
    kind: str = "note"


@dataclass
class Section:
    id: str
    title: str
    intro: str
    blocks: list = field(default_factory=list)


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
header { background: #1d2a3a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #c5d0dc; font-size: 13px; }
nav { background: #fff; border-bottom: 1px solid #dde2e8; padding: 8px 32px; position: sticky; top: 0; }
nav a { margin-right: 18px; color: #2a5d9f; text-decoration: none; font-size: 14px; }
main { padding: 8px 32px 40px 32px; max-width: 1400px; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 6px; margin: 18px 0; padding: 8px 22px 18px 22px; }
h2 { font-size: 19px; margin: 14px 0 4px 0; }
h3 { font-size: 15px; margin: 18px 0 6px 0; color: #35475c; }
p.intro, p.note { color: #4a5868; font-size: 13px; margin: 4px 0 8px 0; max-width: 980px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 4px 0; }
th, td { border-bottom: 1px solid #e6e9ee; padding: 3px 10px; text-align: left; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: normal; min-width: 240px; max-width: 520px; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; border: 1px solid #e6e9ee; }
img.plot { max-width: 100%; border: 1px solid #e6e9ee; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.gallery figure { margin: 0; width: 230px; font-size: 12px; }
.gallery img { max-width: 220px; max-height: 180px; border: 1px solid #dde2e8; display: block; }
.gallery figcaption b { display: block; margin: 4px 0 2px 0; color: #35475c; }
</style>
</head>
<body>
<header><h1>{{ title }}</h1><p>{{ subtitle }}</p></header>
<nav>{% for section in sections %}<a href="#{{ section.id }}">{{ section.title }}</a>{% endfor %}</nav>
<main>
{% for section in sections %}
<section id="{{ section.id }}">
<h2>{{ section.title }}</h2>
{% if section.intro %}<p class="intro">{{ section.intro }}</p>{% endif %}
{% for block in section.blocks %}
{% if block.kind == "table" %}
<h3>{{ block.title }}</h3>
{% if block.note %}<p class="note">{{ block.note }}</p>{% endif %}
<div class="scroll"><table>
<tr>{% for column in block.columns %}<th>{{ column }}</th>{% endfor %}</tr>
{% for row in block.cells %}<tr>{% for value, css in row %}<td{% if css %} class="{{ css }}"{% endif %}>{{ value }}</td>{% endfor %}</tr>
{% endfor %}</table></div>
{% elif block.kind == "figure" %}
<h3>{{ block.title }}</h3>
{% if block.note %}<p class="note">{{ block.note }}</p>{% endif %}
<img class="plot" src="{{ block.data_uri }}" alt="{{ block.title }}" title="{{ block.file }}">
{% elif block.kind == "gallery" %}
<h3>{{ block.title }}</h3>
{% if block.note %}<p class="note">{{ block.note }}</p>{% endif %}
<div class="gallery">{% for item in block.items %}
<figure><img src="{{ item.data_uri }}" alt="{{ item.heading }}" title="{{ item.file }}"><figcaption><b>{{ item.heading }}</b>{{ item.text }}</figcaption></figure>
{% endfor %}</div>
{% else %}
<p class="note">{{ block.text }}</p>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</main>
</body>
</html>
"""


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    """The page's HTML; every text is escaped (captions and reasons are data, not markup)."""
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(TEMPLATE).render(title=title, subtitle=subtitle, sections=sections)
