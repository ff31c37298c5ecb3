"""Report pages: HTML tables and ``write_html``, one self-contained page (pictures embedded as
base64 ``data:`` URIs, so the page can be mailed or pasted as one file). The pictures
themselves are drawn by ``fmapicon.experiments.figures``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from fmapicon.runtime import atomic_write


# --------------------------------------------------------------------------- HTML


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None,
               digits: int = 3, best: dict | None = None, caption: str | None = None) -> str:
    """An HTML table of ``rows`` (dicts); None or NaN shows as a dash.

    ``best`` maps a column to ``"max"`` or ``"min"``: its best value is set in bold, so a
    reader sees at a glance which model wins each figure.
    """
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = columns or list(rows[0])
    headers = headers or {}
    winners = {column: _best_value(rows, column, rule) for column, rule in (best or {}).items()}
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns)
                 + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = _cell(value, digits)
            bold = winners.get(column) is not None and isinstance(value, float) and value == winners[column]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cls = ' class="num"' if numeric or value is None else ""
            cells.append(f"<td{cls}>{'<b>' + text + '</b>' if bold else text}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _best_value(rows, column, rule):
    values = [r.get(column) for r in rows
              if isinstance(r.get(column), float) and math.isfinite(r.get(column))]
    if not values:
        return None
    return max(values) if rule == "max" else min(values)


@dataclass
class Section:
    """One part of a report page.

    Attributes
    ----------
    title : the heading.
    text : a paragraph of plain text (escaped), shown under the heading.
    html : trusted HTML inserted as is (e.g. from ``html_table``).
    images : PNG files to show, each with a caption: a list of ``(path, caption)``.
    """

    title: str
    text: str = ""
    html: str = ""
    images: list = field(default_factory=list)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
p.meta { color: #555; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .95em; }
caption { caption-side: bottom; font-size: .85em; color: #555; padding-top: .4em; text-align: left; }
th, td { border: 1px solid #ccc; padding: .35em .8em; }
th { background: #f1f1f1; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: .6em 1em .6em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; image-rendering: auto; }
figcaption { font-size: .85em; color: #444; max-width: 1050px; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _data_uri(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml",
            "gif": "image/gif"}.get(suffix)
    if mime is None:
        raise ValueError(f"cannot embed {path}: expected a .png, .jpg, .svg or .gif picture")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def machine_line(machine: dict, seconds: float | None = None) -> str:
    """The page's meta line: version, date, machine (``fmapicon.runtime.machine_info()``) and,
    when given, how long the whole job took."""
    from fmapicon import __version__

    line = (f"fmapicon {__version__} · {machine.get('date')} · {machine.get('processor')} with "
            f"{machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} torch threads"
            + (f", {machine['cuda']}" if machine.get("cuda") else ""))
    return line + (f" · {seconds / 60:.1f} min in all" if seconds is not None else "")


def write_html(path, title: str, sections: list[Section], meta: str = "") -> Path:
    """Write one self-contained HTML page: every picture is embedded as a base64 ``data:`` URI.

    A missing picture is an error (a page with a broken image is worse than none).
    Returns the path written (atomically).
    """
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if meta:
        parts.append(f'<p class="meta">{html.escape(meta)}</p>')
    for section in sections:
        parts.append(_section_html(section))
    parts.append("</body></html>")
    path = Path(path)
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(parts) + "\n")
    return path


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text.split("\n\n")]
    if section.html:
        parts.append(section.html)
    for image, caption in section.images:
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"the report refers to a picture that does not exist: {image}")
        alt = html.escape(caption or image.name)
        parts.append(f'<figure><img src="{_data_uri(image)}" alt="{alt}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "\n".join(parts)
