"""Escaping and number formatting for the report: every string that came from a run, a model or a config
passes through `esc` (HTML text and attribute values alike) or `script_json` (data embedded in a
<script type="application/json"> block) before it reaches the page.

Why both: `html.escape` makes `<`, `>`, `&`, `"` and `'` inert in text and quoted attributes, but inside a
<script> element the HTML parser does not decode entities, so JSON there is protected differently: every
`<`, `>` and `&` becomes a JSON unicode escape (\\u003c ...), which JSON.parse turns back into the same
character while the HTML parser never sees a `</script>` that could end the block early.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any


def esc(value: Any) -> str:
    """Text or a double/single-quoted attribute value, safe in HTML and inline SVG."""
    return html.escape("" if value is None else str(value), quote=True)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def clean_json(value: Any) -> Any:
    """A copy that strict JSON can hold: NaN and infinities become null (JSON.parse rejects NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_SCRIPT_SAFE = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(value: Any) -> str:
    """JSON for a <script type="application/json"> block: no character in it can end or confuse the block."""
    text = json.dumps(clean_json(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.translate(_SCRIPT_SAFE)


def fmt(x: Any, digits: int = 4) -> str:
    """A scalar for a table cell: floats to `digits` significant figures, big ints with separators."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == int(x) and 1 <= abs(x) < 1e15:
            return fmt(int(x))
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)) and len(x) <= 4 and all(finite(v) for v in x):
        return "[" + ", ".join(fmt(v, digits) for v in x) + "]"
    if isinstance(x, (dict, list, tuple)):
        return json.dumps(clean_json(x), ensure_ascii=False)[:200]
    return str(x)


def fmt_ci(value: Any, lo: Any, hi: Any) -> str:
    """'1.23 [1.1, 1.4]', or just the value when the interval is missing or not a number."""
    if finite(lo) and finite(hi):
        return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"
    return fmt(value)
