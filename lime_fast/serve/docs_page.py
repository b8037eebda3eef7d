"""The ``/docs`` page: the app's OpenAPI description rendered as plain HTML on the server.

FastAPI's own ``/docs`` (Swagger UI) loads its script and styles from a CDN, so it is blank on a
machine without internet and breaks the page's Content-Security-Policy. This page needs neither: one
HTML document, its styles inline (the CSP allows inline styles, no scripts), every route with its
method, summary, parameters, multipart fields and responses. ``/openapi.json`` stays for tools.
"""

from __future__ import annotations

import json
from html import escape

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin: 2rem 0 .4rem; }
h3 { font-size: .95rem; margin: .9rem 0 .3rem; } .sub { color: #555; }
.method { display: inline-block; min-width: 3.5rem; padding: .1rem .4rem; border-radius: 3px; color: #fff;
          background: #3b6ea5; font: 600 .85rem monospace; text-align: center; }
.method.post { background: #3d8a4f; } code, .path { font-family: monospace; }
/* a table wider than a phone scrolls inside its box; the page itself never scrolls sideways */
table { border-collapse: collapse; font-size: .9rem; display: block; overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td:first-child { white-space: nowrap; } td:last-child { min-width: 14rem; }
section { border-top: 1px solid #ccc; }
"""


def _type(schema: dict) -> str:
    """A short name for a JSON schema's type: string, integer, file, 'a | b', a $ref's name."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema or "oneOf" in schema:
        parts = [_type(s) for s in schema.get("anyOf", schema.get("oneOf", []))]
        return " | ".join(p for p in parts if p != "null") or "null"
    if schema.get("format") == "binary":
        return "file"
    kind = schema.get("type", "any")
    if kind == "array" and "items" in schema:
        return f"list of {_type(schema['items'])}"
    if "enum" in schema:
        return f"{kind}: one of {', '.join(map(str, schema['enum']))}"
    return str(kind)


def _default(schema: dict) -> str:
    return "" if "default" not in schema else json.dumps(schema["default"])


def _table(head: tuple[str, ...], rows: list[tuple]) -> str:
    if not rows:
        return "<p>none</p>"
    cells = lambda row, tag: "".join(f"<{tag}>{escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><thead><tr>{cells(head, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def _fields(op: dict) -> list[tuple]:
    """(name, where, type, required, default, description) of the query/header parameters and the body's fields."""
    rows = [(p["name"], p.get("in", ""), _type(p.get("schema", {})), "yes" if p.get("required") else "",
             _default(p.get("schema", {})), p.get("description", "")) for p in op.get("parameters", [])]
    for ctype, content in op.get("requestBody", {}).get("content", {}).items():
        schema = content.get("schema", {})
        required = set(schema.get("required", []))
        where = "form" if "form" in ctype else "body"
        rows += [(name, where, _type(prop), "yes" if name in required else "", _default(prop), prop.get("description", ""))
                 for name, prop in schema.get("properties", {}).items()]
    return rows


def _operation(path: str, method: str, op: dict) -> str:
    """One route: its heading, description, fields and responses."""
    title = (f'<h2 id="{escape(method)}-{escape(path)}"><span class="method {escape(method)}">{escape(method.upper())}</span> '
             f'<span class="path">{escape(path)}</span> {escape(op.get("summary", ""))}</h2>')
    ctypes = ", ".join(op.get("requestBody", {}).get("content", {}))
    parts = [title]
    if op.get("description"):
        parts.append(f"<p>{escape(op['description'])}</p>")
    if op.get("security"):
        parts.append("<p>Needs <code>Authorization: Bearer &lt;token&gt;</code> when the server has a token.</p>")
    parts.append(f"<h3>Parameters{escape(f' and fields ({ctypes})' if ctypes else '')}</h3>")
    parts.append(_table(("name", "in", "type", "required", "default", "description"), _fields(op)))
    responses = [(code, r.get("description", ""), ", ".join(r.get("content", {})))
                 for code, r in op.get("responses", {}).items()]
    parts.append("<h3>Responses</h3>" + _table(("status", "meaning", "content types"), responses))
    return "<section>" + "".join(parts) + "</section>"


def render_docs(spec: dict) -> str:
    """The HTML page for an OpenAPI ``spec`` (``app.openapi()``): an index of the routes, then each one."""
    info = spec.get("info", {})
    ops = [(path, method, op) for path, item in spec.get("paths", {}).items()
           for method, op in item.items() if isinstance(op, dict) and "responses" in op]
    index = "".join(f'<li><a href="#{escape(m)}-{escape(p)}"><code>{escape(m.upper())} {escape(p)}</code></a> '
                    f'{escape(op.get("summary", ""))}</li>' for p, m, op in ops)
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}: API</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="sub">{escape(info.get("description", ""))}</p>'
            f'<p>The machine-readable description: <a href="/openapi.json">/openapi.json</a>. The page: <a href="/">/</a>.</p>'
            f"<ul>{index}</ul>{''.join(_operation(p, m, op) for p, m, op in ops)}</body></html>")
