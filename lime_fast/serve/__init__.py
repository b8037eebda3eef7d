"""``lime-fast serve``: LIME edits over HTTP, with dynamic batching and a page to use it in a browser.

    lime-fast serve --model shapes-ip2p --port 8000            # then open http://127.0.0.1:8000/
    curl -F image=@in.png -F instruction="make the circle red" http://127.0.0.1:8000/v1/edit -o out.png

Modules: ``app`` (``create_app``, ``ServeConfig``, the routes and their checks), ``batcher`` (the
queue and the worker per engine that forms ``edit_batch`` calls), ``uploads`` (pictures and form
fields), ``warnings_capture`` (an edit's warnings, per thread, for its client), ``docs_page`` (``/docs``
rendered from the OpenAPI description), ``metrics`` (Prometheus text), ``cli`` (the subcommand),
``static/`` (the page).
Needs the serve extra: ``pip install 'lime-fast[serve]'`` (FastAPI, uvicorn, python-multipart);
this module imports none of them until ``create_app`` is called.
"""

from __future__ import annotations

EXTRA_HINT = "pip install 'lime-fast[serve]'"


def __getattr__(name):
    if name in ("create_app", "ServeConfig"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
