"""Text, HTML and colours every view of a result shares: the notebook view of an attribution
(:mod:`fxdepass.results`), the report page (:mod:`fxdepass.report`), the drawn graph (:mod:`fxdepass.drawing`)
and the graph exports (:mod:`fxdepass.export`).  Plain Python: no torch, networkx or pydot.

>>> _chip("' Paris'", 2.5, 3.0, "contribution 2.5")       # a token coloured by its signed value  # doctest: +SKIP
"""
from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["escape_text", "unescape_text", "signed_colour"]


def signed_colour(value: float, largest: float, floor: float = 0.0) -> str:
    """A hex colour for a signed value: blue for positive, red for negative, paler when smaller (but at
    least ``floor`` of the full colour, so faint edges stay visible).

    >>> signed_colour(1.0, 1.0), signed_colour(-0.5, 1.0), signed_colour(0.0, 1.0)
    ('#2166ac', '#d88c95', '#ffffff')
    """
    share = max(min(abs(value) / largest, 1.0) if largest > 0 else 0.0, floor)
    end = (0x21, 0x66, 0xAC) if value >= 0 else (0xB2, 0x18, 0x2B)
    channels = [round(255 + (c - 255) * share) for c in end]
    return "#" + "".join(f"{c:02x}" for c in channels)


# Note [Text in files]
# A token can hold any character: byte-level tokenizers give NUL and other control characters, and a token
# cut inside a character decodes to a lone surrogate.  XML 1.0 cannot hold NUL, most other C0 controls, lone
# surrogates or U+FFFE/U+FFFF, not even as character references, and it turns CR into LF; HTML parsing drops
# NUL; Graphviz reads C strings; and a lone surrogate has no UTF-8 encoding at all.  So GraphML, DOT and the
# HTML report hold each string in its printable form, escape_text: a backslash doubled, and every character
# that Python does not print (not str.isprintable) written as Python writes it in a repr (\t, \n, \r, \xHH,
# \uHHHH, \UHHHHHHHH).  Every backslash of the form then starts an escape, so unescape_text reads it back
# exactly, and the form shows what the string holds (an invisible character becomes visible).  JSON needs
# none of this: json.dumps escapes what it must and json.loads gives every string back.

_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ESCAPE = re.compile(r"\\(?:([\\tnr])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")


def _escape_character(character: str) -> str:
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    if character.isprintable():
        return character
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    r"""The printable form of ``text`` (Note [Text in files]): backslashes doubled, unprintable characters escaped.

    >>> print(escape_text("a\\b\x00\ud800\n c"))
    a\\b\x00\ud800\n c
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape_character, text))


def _unescape(match: re.Match) -> str:
    short, *codes = match.groups()
    if short is not None:
        return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[short]
    code = int(next(c for c in codes if c is not None), 16)
    return chr(code) if code <= 0x10FFFF else match.group()


def unescape_text(text: str) -> str:
    r"""``text`` from its printable form (:func:`escape_text`).

    >>> unescape_text(r"a\\b\x00\ud800\n c") == "a\\b\x00\ud800\n c"
    True
    """
    return _ESCAPE.sub(_unescape, text) if "\\" in text else text


def _e(value: Any) -> str:
    """``value`` as HTML text: its printable form (Note [Text in files]: an HTML page cannot hold every character
    a token can), HTML-escaped.  The report's text goes through it too."""
    return html.escape(escape_text(str(value)), quote=True)


_STYLE = """
.fxdepass{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;line-height:1.45}
.fxdepass h1{font-size:1.4em;margin:.2em 0}.fxdepass h2{font-size:1.1em;margin:1.2em 0 .4em}
.fxdepass .meta{color:#555}.fxdepass .note{color:#666;font-size:.85em;max-width:60em}
.fxdepass .tokens{display:flex;flex-wrap:wrap;gap:3px;font-family:ui-monospace,Menlo,Consolas,monospace}
.fxdepass .tok{padding:2px 5px;border-radius:3px;border:1px solid #ccc;white-space:pre;cursor:default}
.fxdepass .tok.on{outline:2px solid #222}
.fxdepass table{border-collapse:collapse;font-size:.85em}
.fxdepass td,.fxdepass th{padding:2px 6px;border:1px solid #e3e3e3;text-align:right}
.fxdepass th{background:#f4f4f4;font-weight:600}.fxdepass td.l,.fxdepass th.l{text-align:left}
.fxdepass .heat td{min-width:2.2em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8em}
.fxdepass .heat td.on,.fxdepass .heat th.on{outline:2px solid #222}
.fxdepass .graph{overflow:auto;border:1px solid #e3e3e3;max-height:80vh}
"""

def _ink(background: str) -> str:
    """Black or white text, whichever reads better on ``background`` (``#rrggbb``)."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#111"


def _chip(text: str, value: float | None, largest: float, tooltip: str, position: int | None = None) -> str:
    """One token (or component) coloured by its signed value, with a tooltip."""
    colour = signed_colour(value, largest) if value is not None else "#ffffff"
    where = f' data-position="{position}"' if position is not None else ""
    return (f'<span class="tok" style="background:{colour};color:{_ink(colour)}" title="{_e(tooltip)}"{where}>'
            f"{_e(text) or '&nbsp;'}</span>")
