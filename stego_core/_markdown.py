"""Markdown table cells (level 0: no imports from the package): every table writer escapes its cell text here.

A ``|`` in a label (``percentile|auto|none``, a case folder ``a|b``) would split its cell and give the row more
cells than the header; ``<`` ``>`` would let a case named ``<img src=x onerror=alert(1)>`` be read as HTML, and
``*`` `` ` `` as emphasis or code.

>>> row([cell("percentile|auto|none"), cell("<img src=x>"), "0.500"])
'| percentile\\\\|auto\\\\|none | &lt;img src=x&gt; | 0.500 |'
>>> split_row(row([cell("a|b"), "1"]))
['a|b', '1']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_ESCAPES = (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("`", "\\`"), ("<", "&lt;"), (">", "&gt;"))


def cell(value: Any) -> str:
    """``value`` as the text of one table cell: on one line, ``\\ | * ` `` escaped, ``< >`` as entities."""
    text = " ".join(str(value).split())
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return text


def row(cells: Iterable[str]) -> str:
    """One table row of cells already escaped (:func:`cell`) or holding deliberate markup (bold, a link)."""
    return "| " + " | ".join(cells) + " |"


def split_row(line: str) -> list[str]:
    """The cells of a table row as a reader sees them (split at unescaped ``|``, escapes undone): what tests
    count against the header."""
    cells, current, i = [], "", 0
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current += body[i + 1]
            i += 2
            continue
        if body[i] == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += body[i]
        i += 1
    cells.append(current.strip())
    return [c.replace("&lt;", "<").replace("&gt;", ">") for c in cells]
