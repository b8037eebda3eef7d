"""The HTTP service: ``create_app(engine_or_model, ServeConfig(...))`` returns a FastAPI app.

Routes (``/openapi.json`` describes them, FastAPI writes it; ``/docs`` shows it as a page rendered
here, ``lime_fast.serve.docs_page``, as FastAPI's own docs page needs a CDN):

    POST /v1/edit     multipart: image (file), instruction, optional mask (file, white = edit here, the
                      image's size) and mask_convention (auto, white, transparent or opaque: how the
                      mask marks its region), optional EditConfig fields as form fields (steps=4, roi_words=collar,
                      reg_steps=0,3, ...). Answers the edited PNG, or JSON (``Accept: application/json``
                      or ``?format=json``) with the image, RoI mask, overlay and heatmap as base64 PNGs,
                      the content words, timings, the batch it ran in and the edit's warnings (what
                      was adjusted: a shrunk picture, how a mask was read, ...; PNG answers carry them
                      in the X-Lime-Warnings header). A JSON answer also carries a ``session`` id, the
                      segment map and the RoI's segments, for correcting the region:
    POST /v1/refine   multipart or urlencoded: session, add / remove / segments (comma-separated segment
                      ids), optional mask (file) and mask_mode (replace, add, cut). Reruns only the edit
                      pass of the session's edit with the corrected region (``EditResult.refine``) and
                      answers like /v1/edit (its JSON has a new session id, so refinements chain).
    GET  /healthz     liveness and queue depth (never needs the token)
    GET  /v1/models   the model, its default EditConfig, the server's limits
    GET  /metrics     Prometheus text (``lime_fast.serve.metrics``)
    GET  /            the page (``static/index.html``, ``static/app.js``)
    GET  /docs        the routes, their fields and answers, as a page (no external assets)

Every refused request gets a 4xx JSON body ``{"error": "..."}`` naming the problem; an unexpected
failure gets a 500 JSON body without a traceback (the server log has it). Edits run in the batcher's
worker threads (``lime_fast.serve.batcher``), never on the event loop; decoding and PNG encoding run
in the thread pool.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (Request, the bearer credentials), which are imported inside create_app, at definition time.
import asyncio
import base64
import dataclasses
import hmac
import importlib.util
import io
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import MASK_CONVENTIONS
from ..errors import RefineError, RefineUnavailableError
from ..refine import MASK_MODES
from .batcher import Batcher, QueueFull, ShuttingDown
from .docs_page import render_docs
from .metrics import Metrics
from .sessions import SessionNotFound, SessionStore, owner_key
from .uploads import (CONFIG_FIELDS, FIELD_TYPES, BadRequest, check_text, decode_image, decode_mask,
                      mask_convention_field, parse_config)
from .warnings_capture import call_capturing

log = logging.getLogger("lime_fast.serve")
STATIC = Path(__file__).with_name("static")
TOKEN_ENV = "LIME_FAST_TOKEN"
RESERVED = ("image", "mask", "instruction")
REFINE_FIELDS = ("session", "add", "remove", "segments", "mask", "mask_mode", "mask_convention")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class ServeConfig:
    """Settings of the service (``lime-fast serve`` has an option for each).

    max_batch: most edits per UNet batch (larger batches share each UNet evaluation; past a point they
        are memory-bound: measured figures in benchmarks/RESULTS.md, "Settings and their measurements").
    batch_window_ms: how long a batch waits for more requests after its first one arrived. Under
        load batches fill while the previous batch runs, so the window only matters when idle: it
        is the latency a lone request pays for the chance to share.
    max_queue: most edits waiting; more get 503 with a Retry-After estimate.
    timeout_s: a request not answered within this many seconds gets 504 (and its edit is dropped
        if it has not started).
    max_upload_bytes: largest request body (the picture, the mask and the fields together): 413.
    max_pixels: largest picture (width x height, read from the file's header before decoding): 413.
    max_steps: largest ``steps`` a request may ask for (the cost of an edit grows with it).
    token: when set, /v1/* and /metrics need ``Authorization: Bearer <token>``.
    model_name: the name /v1/models and /healthz report.
    max_queue_mb: most MiB of decoded pictures and masks waiting (a 4096 x 4096 upload holds 48 MiB
        decoded); more get 503 with Retry-After.
    rate_limit: most edits per minute per client address (a bucket of one minute's allowance, refilled
        continuously); more get 429 with Retry-After. None: no limit. Behind a reverse proxy every
        request comes from the proxy's address: limit there instead.
    grace_s: after SIGTERM / Ctrl-C, how long running edits may take to finish (queued ones are
        answered 503 at once); then they are answered 503 and stopped.
    max_connections: most open connections (default 1000), always kept below the open-file limit
        (``lime_fast.serve.server.connection_cap``).
    header_timeout_s: a connection that has not sent its request line and headers within this
        many seconds is closed.
    body_timeout_s: a request whose body stalls (no bytes) for this many seconds gets 408.
    max_sessions: most edits kept for ``POST /v1/refine`` (``lime_fast.serve.sessions``): each JSON answer
        of /v1/edit and /v1/refine keeps its result (its encoding and noise on the device, e.g. 1.3 MB
        for SD 1.5 at 512 x 512 in fp16) under a session id; past the bound the least recently used
        session is dropped. 0: keep none (JSON answers have ``session: null``).
    session_mb: most MiB of device memory the kept results may hold (their ``refine_bytes`` summed);
        past it the least recently used sessions are dropped; a result larger than all of it is not kept.
    session_ttl_s: a session unused for this many seconds expires (its tensors are released).
    """

    max_batch: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 256
    timeout_s: float = 300.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    max_steps: int = 100
    token: str | None = None
    model_name: str | None = None
    max_queue_mb: float = 1024.0
    rate_limit: float | None = None
    grace_s: float = 30.0
    max_connections: int | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_sessions: int = 16
    session_mb: float = 256.0
    session_ttl_s: float = 600.0

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_upload_bytes", "max_pixels", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0 or not self.timeout_s > 0:
            raise ValueError(f"batch_window_ms must be >= 0 and timeout_s > 0, got {self.batch_window_ms}, {self.timeout_s}")
        for name in ("max_queue_mb", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError(f"rate_limit must be > 0 edits per minute (or None for no limit), got {self.rate_limit}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_sessions < 0 or self.session_mb < 0 or not self.session_ttl_s > 0:
            raise ValueError(f"need max_sessions >= 0, session_mb >= 0 and session_ttl_s > 0; got {self.max_sessions}, "
                             f"{self.session_mb}, {self.session_ttl_s}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty: give a secret string, or none for no authentication")


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    """The request body stopped arriving for ``ServeConfig.body_timeout_s`` seconds (408)."""


class Guard:
    """ASGI middleware, outermost: refuses request bodies over ``max_bytes`` (by Content-Length
    before reading, and by counting while the route reads a chunked body) and marks every response
    ``nosniff``. What an over-large client sends anyway is read and dropped, up to 4 x the limit, so
    it sees the 413 instead of a reset connection (a client that sent ``Expect: 100-continue``, as
    curl does for large bodies, gets the 413 before it sends anything)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, body_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.metrics, self.body_timeout_s = app, max_bytes, metrics, body_timeout_s

    def _message(self, size: str) -> bytes:
        mib = self.max_bytes / 2**20
        return (f'{{"error": "the request body is {size}; this server accepts at most {self.max_bytes:,} bytes '
                f'({mib:.3g} MiB, --max-upload-mb): send a smaller picture"}}').encode()

    async def _drain(self, receive) -> None:
        seen, more = 0, True
        while more and seen <= 4 * self.max_bytes:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_nosniff(msg):
            if msg["type"] == "http.response.start":
                msg["headers"] = list(msg.get("headers", [])) + [(b"x-content-type-options", b"nosniff")]
            await send(msg)

        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":  # curl waits for "100 Continue": nothing to drain
                await self._drain(receive)
            if scope["path"] == "/v1/edit":
                self.metrics.observe_request(413, 0.0)
            body = self._message(f"{int(declared):,} bytes")
            await send_nosniff({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                            (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen, complete = 0, False

        async def limited():
            nonlocal seen, complete
            if complete:  # the body is in: later receives wait for a disconnect, as long as the edit takes
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyStalled(f"no part of the request body arrived for {self.body_timeout_s:g} s") from None
            if msg["type"] == "http.request":
                complete = not msg.get("more_body", False)
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    if msg.get("more_body", False):
                        await self._drain(receive)
                    raise BodyTooLarge(self._message(f"over {self.max_bytes:,} bytes").decode())
            return msg

        await self.app(scope, limited, send_nosniff)


def _load_engines(engine_or_model, device, torch_dtype) -> list:
    """A LimeEngine, a list of them (one per device), or a model name/folder (loaded once per device:
    ``device`` may be a list, e.g. ["cuda:0", "cuda:1"])."""
    if isinstance(engine_or_model, (list, tuple)):
        return list(engine_or_model)
    if hasattr(engine_or_model, "edit_batch"):
        return [engine_or_model]
    import lime_fast

    devices = device if isinstance(device, (list, tuple)) else [device]
    return [lime_fast.get_engine(engine_or_model, device=d, torch_dtype=torch_dtype) for d in dict.fromkeys(devices)]


def _limits(engine, config: ServeConfig) -> dict[str, int]:
    """Largest value a request may set per EditConfig field: a request must not be able to make the
    server do unbounded work (steps, k-means iterations, the grid) or ask for levels the UNet lacks.
    Per model: the working size at most the model's own ``max_side``, the grid at most twice its own
    (the k-means costs grow with the grid's cells: 512 x 512 at 64 clusters and 16 restarts ran past
    15 minutes on a CPU), at most 32 clusters, 4 restarts, 500 iterations."""
    base = engine.default_config
    limits = {"steps": config.max_steps, "grid_size": max(64, 2 * base.grid_size), "clusters": max(32, base.clusters),
              "kmeans_n_init": max(4, base.kmeans_n_init), "kmeans_max_iter": max(500, base.kmeans_max_iter),
              "max_side": base.max_side}
    unet = getattr(engine, "unet", None)
    if unet is not None:
        limits["feature_levels"] = limits["reg_levels"] = len(unet.config.block_out_channels) - 1
    return limits


def _openapi_body(base) -> dict:
    kinds = {int: "integer", float: "number", str: "string"}
    props = {
        "image": {"type": "string", "format": "binary", "description": "the picture (PNG, JPEG, WebP, GIF or BMP)"},
        "instruction": {"type": "string", "description": 'the edit, e.g. "make the circle red"'},
        "mask": {"type": "string", "format": "binary",
                 "description": "optional region to edit (white = edit), the image's size; skips localization"},
        "mask_convention": {"type": "string", "enum": list(MASK_CONVENTIONS), "default": "auto",
                            "description": "how the mask marks its region: white (grayscale >= 128), transparent "
                            "(alpha < 128: DALL-E 2, MagicBrush), opaque (alpha >= 128) or auto"},
    }
    for name in CONFIG_FIELDS:
        hint, value = FIELD_TYPES[name], getattr(base, name)
        about = f"EditConfig.{name} ({hint.__name__ if isinstance(hint, type) else hint}); omitted: the model's default"
        if "tuple" in str(hint):
            about += "; comma-separated (0,1) or a JSON list"
        props[name] = {"type": kinds.get(hint, "string"), "description": about,
                       "default": list(value) if isinstance(value, tuple) else value}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image", "instruction"], "properties": props}}}}}


def _openapi_refine_body() -> dict:
    ids = "comma-separated segment ids (e.g. 3,5): the segment_grid / segment_ids_png of the JSON answer show them"
    props = {
        "session": {"type": "string", "description": "the session id of a JSON answer of /v1/edit or /v1/refine; "
                    "bound to the token (or, without one, the address) that made it"},
        "add": {"type": "string", "description": f"segments to add to the region: {ids}"},
        "remove": {"type": "string", "description": f"segments to take out of the region: {ids}"},
        "segments": {"type": "string", "description": f"start from exactly these segments instead of the session's "
                     f"region: {ids}"},
        "mask": {"type": "string", "format": "binary", "description": "optional painted region (white = region), the "
                 "input picture's size"},
        "mask_mode": {"type": "string", "enum": list(MASK_MODES), "default": "replace",
                      "description": "replace: the region is the mask (then add / remove); add / cut: union with it / "
                      "minus it (after add / remove)"},
        "mask_convention": {"type": "string", "enum": list(MASK_CONVENTIONS), "default": "auto",
                            "description": "how the mask marks its region, as for /v1/edit"},
    }
    return {"description": "Reruns only the regularized edit pass (and the decode) of the session's edit on its "
                           "cached encoding and noise, with the region corrected; the same image bit for bit as "
                           "EditResult.refine. Runs in the batch worker of the engine that made the edit, queued "
                           "with the edits. Sessions: --sessions, --session-mb, --session-ttl (GET /v1/models). "
                           "Also accepts application/x-www-form-urlencoded without a mask.",
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": {"type": "object", "required": ["session"], "properties": props}}}}}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def warning_headers(warned: list[str], max_chars: int = 2000) -> dict[str, str]:
    """The edit's warnings as response headers: ``X-Lime-Warning-Count`` always, ``X-Lime-Warnings`` (the
    messages joined by " | ", cut to ``max_chars``) when there are any. Header values must be latin-1
    and one line, and a message may quote the instruction: non-ASCII is written as backslash escapes and
    control characters (a CR/LF would start a new header) become spaces."""
    headers = {"X-Lime-Warning-Count": str(len(warned))}
    if warned:
        text = " | ".join(warned).encode("ascii", "backslashreplace").decode("ascii")
        text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
        headers["X-Lime-Warnings"] = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
    return headers


def roi_segment_ids(segments, roi_grid) -> list[int]:
    """The ids of the segments (int [gh, gw]) at least half inside the RoI (bool [gh, gw]), ascending: an
    automatic RoI is a union of whole segments, so these are exactly its segments; a painted or brushed
    region may cut segments, and then the ones mostly inside it count."""
    import numpy as np

    ids = np.unique(segments)
    return [int(i) for i in ids if roi_grid[segments == i].mean() >= 0.5]


def region_json(result, session: str | None) -> dict:
    """What a client needs to correct the region: the session id (None: not kept), the segment map as
    rows of ids (int [gh][gw]: a click at input pixel (x, y) is cell (floor(y * gh / H), floor(x * gw / W))),
    the RoI on the same grid (0/1 rows), the RoI's segments (``roi_segment_ids``), the numbered
    segment picture (base64 PNG, ``viz.segment_id_image``) and how the region was refined (None for an
    edit). Segment fields are None when the edit had a user mask (nothing was segmented)."""
    from .. import viz

    seg, roi, ref = result.segments, result.roi_grid, getattr(result, "refinement", None)
    return {
        "session": session,
        "grid": [int(roi.shape[1]), int(roi.shape[0])],
        "roi_grid": roi.astype(int).tolist(),
        "segment_grid": None if seg is None else seg.astype(int).tolist(),
        "roi_segments": None if seg is None else roi_segment_ids(seg, roi),
        "segment_ids_png": None if seg is None else base64.b64encode(_png(viz.segment_id_image(
            seg, result.input_image.size, roi))).decode("ascii"),
        "refinement": None if ref is None else {"segments": None if ref.segments is None else list(ref.segments),
                                                "added": list(ref.added), "removed": list(ref.removed),
                                                "mask_mode": ref.mask_mode, "skipped": list(ref.skipped)},
    }


def _result_json(result, job, request_id: str, warned: list[str] = (), session: str | None = None) -> dict:
    from .. import viz

    b64 = lambda img: base64.b64encode(_png(img)).decode("ascii")  # noqa: E731
    size = result.input_image.size
    return {
        "id": request_id,
        "width": size[0],
        "height": size[1],
        "image_png": b64(result.image),
        "roi_mask_png": b64(viz.mask_image(result.roi_mask)),
        "overlay_png": b64(result.overlay()),
        "heatmap_png": None if result.heatmap is None else b64(viz.heatmap_image(result.heatmap, size)),
        "tokens": list(result.tokens),
        "silenced": list(result.silenced),
        "fallback": result.fallback,
        "roi_area": round(float(result.roi_mask.mean()), 6),
        "unet_evals": result.unet_evals,
        "batch_size": job.batch_size,
        "queue_seconds": round(job.started - job.submitted, 4),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "warnings": list(warned),
        **region_json(result, session),
    }


def authorize(token: str | None, credentials) -> None:
    """Nothing when the server has no token or ``credentials`` (HTTP bearer credentials, or None) carry it
    (compared in constant time); else ``BadRequest`` 401 saying how to send it."""
    if token is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, token.encode()):
        raise BadRequest(401, "missing or wrong token: send the header 'Authorization: Bearer <token>' with the "
                              "token the server was started with (--token or LIME_FAST_TOKEN)",
                         {"WWW-Authenticate": "Bearer"})


def check_origin(token: str | None, origin: str | None, host: str | None) -> None:
    """Without a token, only same-origin browser requests may edit: a page from another origin (its Origin
    header's host differs from the Host the request was sent to) gets 403, so a web page a local user opens
    cannot start edits on their server. Requests without an Origin (curl, scripts) and servers with a token
    are not affected."""
    if token is not None or not origin:
        return
    from urllib.parse import urlsplit

    if origin == "null" or urlsplit(origin).netloc.lower() != (host or "").lower():
        raise BadRequest(403, f"cross-origin request from {origin!r} refused: this server has no token, so only its own "
                              "page may call it from a browser; start it with --token to allow other origins")


def request_id(header: str) -> str:
    """The client's X-Request-Id when it is a safe token (letters, digits, ._:-, up to 64), else a new one."""
    return header if _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex


def wants_json(fmt: str | None, accept: str) -> bool:
    """JSON or PNG: ``?format=`` (png or json) wins over the Accept header; BadRequest for another format."""
    if fmt not in (None, "png", "json"):
        raise BadRequest(400, f"format must be png or json, got {fmt!r}")
    return fmt == "json" or (fmt is None and "application/json" in accept)


def split_form(items: list[tuple[str, object]]) -> tuple:
    """A multipart form's (name, value) items -> (image upload, mask upload or None, instruction, {EditConfig
    field: [text values]}); ``BadRequest`` 400 naming the first problem (an unknown or repeated field, a
    missing image or instruction, a file where text belongs or the reverse)."""
    from starlette.datastructures import UploadFile

    unknown = sorted({k for k, _ in items} - set(RESERVED) - {"mask_convention"} - set(CONFIG_FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)}. Send image, instruction, optionally mask and "
                              f"mask_convention, and EditConfig fields: {', '.join(CONFIG_FIELDS)}")
    values: dict[str, list] = {}
    for k, v in items:
        values.setdefault(k, []).append(v)
    for k in RESERVED:
        if len(values.get(k, [])) > 1:
            raise BadRequest(400, f"{k} was given {len(values[k])} times; give it once")
    image, mask = values.get("image", [None])[0], values.get("mask", [None])[0]
    instruction = values.get("instruction", [None])[0]
    if image is None:
        raise BadRequest(400, "image is missing: send the picture as a file field, e.g. curl -F image=@photo.png")
    if not isinstance(image, UploadFile):
        raise BadRequest(400, "image must be a file upload (curl -F image=@photo.png), not a text field")
    if mask is not None and not isinstance(mask, UploadFile):
        raise BadRequest(400, "mask must be a file upload (curl -F mask=@mask.png), not a text field")
    if instruction is None:
        raise BadRequest(400, "instruction is missing: say what to change, e.g. -F instruction='make the circle red'")
    if not isinstance(instruction, str):
        raise BadRequest(400, "instruction must be a text field, not a file")
    fields = {k: v for k, v in values.items() if k not in RESERVED}
    for k, vs in fields.items():
        if any(not isinstance(v, str) for v in vs):
            raise BadRequest(400, f"{k} must be a text field, not a file")
    return image, mask, instruction, fields


def parse_ids(name: str, text: str) -> tuple[int, ...]:
    """A form field of segment ids ("3,5", "3 5" or "[3, 5]") -> (3, 5); BadRequest 400 naming the field
    otherwise. Empty: () (nothing to add or remove)."""
    parts = [p for p in re.split(r"[\s,]+", text.strip().strip("[]")) if p]
    if not all(re.fullmatch(r"\d{1,6}", p) for p in parts):
        raise BadRequest(400, f"{name}: expected segment ids separated by commas (e.g. 3,5; the segment_ids picture "
                              f"shows them), got {text[:80]!r}")
    return tuple(int(p) for p in parts)


@dataclass
class RefineForm:
    """A ``POST /v1/refine`` request's fields. add / remove: segment ids; segments: start from exactly
    these (None: from the session's region); mask: the upload or None; mask_mode: how it applies."""

    session: str
    add: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()
    segments: tuple[int, ...] | None = None
    mask: object = None
    mask_mode: str = "replace"
    mask_convention: str = "auto"


def split_refine_form(items: list[tuple[str, object]]) -> RefineForm:
    """A refine form's (name, value) items -> ``RefineForm``; BadRequest 400 naming the first problem (an
    unknown or repeated field, no session, ids that are not ids, a mask that is not a file, a mask_mode
    without a mask or not one of replace, add, cut)."""
    from starlette.datastructures import UploadFile

    unknown = sorted({k for k, _ in items} - set(REFINE_FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)}. Send session, and any of add, remove, segments "
                              "(comma-separated segment ids), mask (a file) with mask_mode and mask_convention")
    values: dict[str, list] = {}
    for k, v in items:
        values.setdefault(k, []).append(v)
    repeated = [k for k, vs in values.items() if len(vs) > 1]
    if repeated:
        raise BadRequest(400, f"{repeated[0]} was given {len(values[repeated[0]])} times; give it once")
    one = {k: vs[0] for k, vs in values.items()}
    for k, v in one.items():
        if k != "mask" and not isinstance(v, str):
            raise BadRequest(400, f"{k} must be a text field, not a file")
    if not one.get("session", "").strip():
        raise BadRequest(400, "session is missing: send the session id a JSON answer of /v1/edit gave")
    mask = one.get("mask")
    if mask is not None and not isinstance(mask, UploadFile):
        raise BadRequest(400, "mask must be a file upload (curl -F mask=@region.png), not a text field")
    mode = one.get("mask_mode", "replace").strip()
    if mode not in MASK_MODES:
        raise BadRequest(400, f"mask_mode must be one of {', '.join(MASK_MODES)}; got {mode!r}")
    if "mask_mode" in one and mask is None:
        raise BadRequest(400, "mask_mode was given without a mask: send the mask file too")
    segments = None if "segments" not in one else parse_ids("segments", one["segments"])
    if segments == ():
        raise BadRequest(400, "segments is empty: name at least one segment id, or leave it out to start from the "
                              "session's region")
    convention = mask_convention_field({"mask_convention": [one.get("mask_convention", "auto")]})
    return RefineForm(one["session"].strip(), parse_ids("add", one.get("add", "")), parse_ids("remove", one.get("remove", "")),
                      segments, mask, mode, convention)


async def read_form(request):
    """The request's multipart form, with bounded parts; BadRequest 415 for another content type, 400 for
    a body python-multipart cannot parse."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    ctype = request.headers.get("content-type", "")
    refine = request.url.path == "/v1/refine"
    kinds = ("multipart/form-data", "application/x-www-form-urlencoded") if refine else ("multipart/form-data",)
    if not ctype.lower().startswith(kinds):
        example = ("curl -F session=ID -F add=3 URL" if refine
                   else "curl -F image=@photo.png -F instruction='make the circle red' URL")
        raise BadRequest(415, f"send {' or '.join(kinds)} (got {ctype or 'no content type'!r}): e.g. {example}")
    try:
        return await request.form(max_files=2, max_fields=len(CONFIG_FIELDS) + 8, max_part_size=64 * 1024)
    except (BodyTooLarge, BodyStalled, ClientDisconnect, HTTPException):
        raise
    except Exception as e:  # python-multipart's parse errors
        raise BadRequest(400, f"cannot parse the multipart body ({type(e).__name__}: {e})") from None


class RateLimiter:
    """Per-client token buckets: ``per_minute`` edits a minute, a burst of at most one minute's
    allowance; ``take`` raises BadRequest(429) with Retry-After when a client's bucket is empty.
    ``per_minute`` None: no limit. Holds at most ``max_clients`` buckets (full ones are forgotten first)."""

    def __init__(self, per_minute: float | None, max_clients: int = 10_000, clock=time.monotonic):
        self.rate = None if per_minute is None else per_minute / 60.0  # tokens per second
        self.capacity = per_minute
        self.max_clients, self.clock = max_clients, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def take(self, client: str) -> None:
        if self.rate is None:
            return
        now = self.clock()
        tokens = self._tokens(client, now)
        if tokens < 1:
            wait = max(1, int((1 - tokens) / self.rate + 0.999))
            raise BadRequest(429, f"too many edits from {client}: at most {self.capacity:g} a minute; "
                                  f"try again in {wait} s", {"Retry-After": str(wait)})
        if client not in self._buckets and len(self._buckets) >= self.max_clients:
            self._buckets = {c: v for c, v in self._buckets.items() if self._tokens(c, now) < self.capacity}
        self._buckets[client] = (tokens - 1, now)


async def _wait_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Service:
    """What the routes share: the settings, the engines, the batcher and metrics, and the request limits.
    ``edit`` is the whole POST /v1/edit apart from HTTP framing (``create_app`` registers the routes)."""

    cfg: ServeConfig
    engines: list
    name: str
    batcher: Batcher
    metrics: Metrics
    limits: dict
    has_cuml: bool
    limiter: "RateLimiter"
    sessions: SessionStore = None

    @property
    def base(self):
        return self.engines[0].default_config

    async def edit(self, request, fmt: str | None, credentials):
        """Authorize, parse and check the request, queue the edit, wait for it (or the client leaving, or the
        timeout) and answer the PNG or JSON; every refusal is a ``BadRequest``."""
        from starlette.responses import Response

        rid, want_json = self._admit(request, fmt, credentials)
        image, mask, text, edit_cfg, warned = await self._inputs(request)
        job = self._submit(self.batcher.submit, image, text, mask, edit_cfg)
        result = await self._wait(request, job)
        if result is None:
            return Response(status_code=499)  # the client left; nobody reads it ('disconnected')
        return await self._answer(result, job, rid, want_json, warned, self._owner(request, credentials))

    def _owner(self, request, credentials) -> str:
        """Who the request's sessions belong to (``lime_fast.serve.sessions.owner_key``)."""
        return owner_key(self.cfg.token, credentials.credentials if credentials is not None else None,
                         request.client.host if request.client else None)

    async def _answer(self, result, job, rid: str, want_json: bool, warned: list[str], owner: str):
        """The PNG or JSON answer of an edit or a refinement; a JSON answer keeps the result as a session."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, Response

        warned = list(dict.fromkeys(warned + job.warnings))
        headers = {"X-Request-Id": rid, "X-Lime-Batch-Size": str(job.batch_size),
                   "X-Lime-Queue-Seconds": f"{job.started - job.submitted:.4f}",
                   "X-Lime-Edit-Seconds": f"{result.timings.get('total', 0.0):.4f}", **warning_headers(warned)}
        if want_json:
            sid = self.sessions.add(result, owner, job.ran_on)
            return JSONResponse(await run_in_threadpool(_result_json, result, job, rid, warned, sid), headers=headers)
        return Response(await run_in_threadpool(_png, result.image), media_type="image/png", headers=headers)

    async def refine(self, request, fmt: str | None, credentials):
        """POST /v1/refine apart from HTTP framing: authorize, find the caller's session (404 otherwise), queue
        the refinement on the engine that made the edit (``Batcher.submit_call``: it runs in that engine's
        worker, never beside an edit on it), wait, answer like ``edit``."""
        from starlette.responses import Response

        rid, want_json = self._admit(request, fmt, credentials)
        owner = self._owner(request, credentials)
        form, session, mask, warned = await self._refine_inputs(request, owner)
        result = session.result

        def task(engine):  # in the engine's worker thread
            return result.refine(add=form.add, remove=form.remove, segments=form.segments, mask=mask,
                                 mask_mode=form.mask_mode)

        job = self._submit(self.batcher.submit_call, session.engine or self.engines[0], task, mask=mask)
        refined = await self._wait(request, job)
        if refined is None:
            return Response(status_code=499)
        return await self._answer(refined, job, rid, want_json, warned, owner)

    async def _refine_inputs(self, request, owner: str) -> tuple:
        """(RefineForm, the owner's ``Session`` (BadRequest 404 when there is none), mask bool [H, W] at the
        session's input size or None, [warnings of reading the mask]) from the form."""
        from starlette.concurrency import run_in_threadpool

        form = await read_form(request)
        try:
            fields = split_refine_form(form.multi_items())
            try:
                session = self.sessions.get(fields.session, owner)
            except SessionNotFound as e:
                raise BadRequest(404, str(e)) from None
            mask, warned = None, []
            if fields.mask is not None:
                mask, warned = await run_in_threadpool(call_capturing, decode_mask, await fields.mask.read(),
                                                       session.result.input_image.size, self.cfg.max_pixels,
                                                       fields.mask_convention)
        finally:
            await form.close()
        return fields, session, mask, warned

    async def _inputs(self, request) -> tuple:
        """(image, mask or None, instruction, EditConfig, [warnings]) from the form, decoded in the thread pool."""
        from starlette.concurrency import run_in_threadpool

        form = await read_form(request)
        try:
            upload, mask_upload, instruction, fields = split_form(form.multi_items())
            convention = mask_convention_field(fields)
            edit_cfg = parse_config(self.base, fields, self.limits)
            if edit_cfg.segment_backend == "cuml" and not self.has_cuml:
                raise BadRequest(400, "segment_backend=cuml needs cuML, which this server does not have")
            text = check_text(instruction)
            # the pictures are decoded in the thread pool; what reading them warns (e.g. how the mask
            # was read) goes to the client with the answer
            image, warned = await run_in_threadpool(call_capturing, decode_image, await upload.read(), "image",
                                                    self.cfg.max_pixels)
            mask = None
            if mask_upload is not None:
                mask, more = await run_in_threadpool(call_capturing, decode_mask, await mask_upload.read(), image.size,
                                                     self.cfg.max_pixels, convention)
                warned += more
        finally:
            await form.close()
        return image, mask, text, edit_cfg, warned

    def _admit(self, request, fmt: str | None, credentials) -> tuple[str, bool]:
        """Authorize the request, check its origin and the client's rate; (request id, JSON wanted)."""
        authorize(self.cfg.token, credentials)
        check_origin(self.cfg.token, request.headers.get("origin"), request.headers.get("host"))
        self.limiter.take(request.client.host if request.client else "?")
        return request_id(request.headers.get("x-request-id", "")), wants_json(fmt, request.headers.get("accept", ""))

    @staticmethod
    def _submit(submit, *args, **kwargs):
        """``submit(*args, **kwargs)`` (a batcher's submit or submit_call); a full queue or a shutdown as 503."""
        try:
            return submit(*args, **kwargs)
        except QueueFull as e:
            raise BadRequest(503, f"{e}: try again in {e.retry_after} s", {"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise BadRequest(503, str(e), {"Retry-After": "5"}) from None

    async def _wait(self, request, job):
        """The job's EditResult; None when the client disconnected first; BadRequest on the timeout or a
        failed edit."""
        done_fut = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({done_fut, gone}, timeout=self.cfg.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if done_fut not in done:
            self.batcher.cancel(job)
            done_fut.cancel()
            if gone in done:
                return None
            raise BadRequest(504, f"the edit did not finish within {self.cfg.timeout_s:g} s (--timeout); "
                                  f"{self.batcher.depth} edits are waiting: try again later")
        try:
            return done_fut.result()
        except ShuttingDown as e:
            raise BadRequest(503, str(e), {"Retry-After": "5"}) from None
        except RefineError as e:  # the client's request: an unknown id, segments of a mask edit, ...
            raise BadRequest(400, str(e)) from None
        except RefineUnavailableError:  # released (evicted) while the refinement waited
            raise BadRequest(404, "the session expired while the refinement waited; run the edit again") from None
        except (TypeError, ValueError) as e:  # settings this model cannot run (checked ones never get here)
            raise BadRequest(400, f"the edit failed with these settings: {e}") from None

    def health(self) -> tuple[dict, int]:
        b = self.batcher
        body = {"status": "ok" if b.alive else "unavailable", "model": self.name, "workers": len(self.engines),
                "queue_depth": b.depth, "running": b.running, "auth": self.cfg.token is not None,
                "seconds_per_edit": b.seconds_per_edit, "seconds_per_batch": b.seconds_per_batch}
        return body, 200 if b.alive else 503

    def models(self) -> dict:
        engine, cfg = self.engines[0], self.cfg
        return {
            "data": [{"id": self.name, "devices": [str(getattr(e, "device", "?")) for e in self.engines],
                      "dtype": str(getattr(engine, "dtype", "?")).removeprefix("torch."),
                      "size_multiple": engine.multiple, "trained_size": getattr(engine, "trained_size", None),
                      "default_config": dataclasses.asdict(self.base)}],
            "batching": {"max_batch": cfg.max_batch, "batch_window_ms": cfg.batch_window_ms, "max_queue": cfg.max_queue},
            "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels, "timeout_s": cfg.timeout_s,
                       "max_queue_mb": cfg.max_queue_mb, "rate_limit_per_minute": cfg.rate_limit,
                       "max_sessions": cfg.max_sessions, "session_mb": cfg.session_mb, "session_ttl_s": cfg.session_ttl_s,
                       **self.limits},
        }


EDIT_RESPONSES = {  # what /docs lists for POST /v1/edit
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "the edited picture (PNG), or JSON with format=json / Accept: application/json"},
    400: {"description": "a bad field, value or picture; the JSON error names it"},
    401: {"description": "missing or wrong bearer token"},
    408: {"description": "the body stalled"}, 413: {"description": "upload or picture too large"},
    415: {"description": "not a picture"}, 429: {"description": "rate limit (Retry-After)"},
    503: {"description": "queue full or shutting down (Retry-After)"}, 504: {"description": "timed out"},
}
REFINE_RESPONSES = {  # what /docs lists for POST /v1/refine
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "the refined picture (PNG), or JSON (format=json) as /v1/edit's with a new session id"},
    400: {"description": "a bad field, an unknown segment id, a segment both added and removed, segments of an edit "
                         "made with a mask (it has none), a mask of the wrong size"},
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "no such session for you: expired, evicted, or never made (or made by someone else)"},
    413: {"description": "upload too large"}, 415: {"description": "not a form, or the mask is not a picture"},
    429: {"description": "rate limit (Retry-After)"},
    503: {"description": "queue full or shutting down (Retry-After)"}, 504: {"description": "timed out"},
}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'")


def create_app(engine_or_model, config: ServeConfig | None = None, *, device=None, torch_dtype=None):
    """The service as a FastAPI app. ``engine_or_model``: a ``LimeEngine`` (or a list, one per device)
    or a model (hub id, folder, ``shapes-ip2p``; loaded now, once per ``device``). The batcher's
    workers start and stop with the app's lifespan (uvicorn runs it; with Starlette's TestClient use
    ``with TestClient(app)``). The routes are thin: the work is ``Service``'s and the module's functions."""
    from fastapi import FastAPI
    from fastapi.security import HTTPBearer
    from starlette.concurrency import run_in_threadpool

    from .. import __version__

    cfg = config or ServeConfig()
    svc = _service(engine_or_model, cfg, device, torch_dtype)

    @asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        try:
            yield
        finally:  # lime_fast.serve.server has already given running edits their grace period
            await run_in_threadpool(svc.batcher.stop, cfg.grace_s)
            svc.sessions.clear()

    # docs_url=None, redoc_url=None: FastAPI's pages load Swagger UI / ReDoc from a CDN (blank offline);
    # /docs is ours (lime_fast.serve.docs_page), rendered from the same OpenAPI description
    app = FastAPI(title="lime-fast", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="LIME localized image editing as a service, with dynamic batching. "
                              "POST /v1/edit with multipart form data; see docs/service.md.")
    app.state.batcher, app.state.metrics, app.state.config, app.state.service = svc.batcher, svc.metrics, cfg, svc
    bearer = HTTPBearer(auto_error=False, description="only when the server was started with --token")
    _error_handlers(app)
    _edit_routes(app, svc, bearer)
    _read_routes(app, svc, bearer)
    app.add_middleware(Guard, max_bytes=cfg.max_upload_bytes, metrics=svc.metrics, body_timeout_s=cfg.body_timeout_s)
    return app


def _service(engine_or_model, cfg: ServeConfig, device, torch_dtype) -> Service:
    """The engines (loaded now), the batcher, the session store and the rest the routes share."""
    engines = _load_engines(engine_or_model, device, torch_dtype)
    name = cfg.model_name or (str(engine_or_model) if isinstance(engine_or_model, (str, Path)) else type(engines[0]).__name__)
    metrics = Metrics()
    batcher = Batcher(engines, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000, max_queue=cfg.max_queue,
                      max_queue_bytes=int(cfg.max_queue_mb * 2**20), metrics=metrics)
    sessions = SessionStore(cfg.max_sessions, int(cfg.session_mb * 2**20), cfg.session_ttl_s)
    return Service(cfg, engines, name, batcher, metrics, _limits(engines[0], cfg), importlib.util.find_spec("cuml") is not None,
                   RateLimiter(cfg.rate_limit), sessions)


async def respond(handler, metrics: Metrics | None = None):
    """Run a route's ``handler()``: a ``BadRequest`` becomes its JSON error and a client that left 499;
    413 / 408 / malformed multipart go on to their exception handlers. With ``metrics``, the outcome
    and the seconds are recorded (Guard records the 413s it answers before any route runs)."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    t0, status = time.monotonic(), 500
    try:
        response = await handler()
        status = response.status_code
        return response
    except BadRequest as e:
        status = e.status
        return _error(e.status, e.message, e.headers)
    except ClientDisconnect:
        status = 499
        return Response(status_code=499)
    except (BodyTooLarge, BodyStalled, HTTPException) as e:
        status = 413 if isinstance(e, BodyTooLarge) else 408 if isinstance(e, BodyStalled) else e.status_code
        raise
    finally:
        if metrics is not None:
            metrics.observe_request(status, time.monotonic() - t0)


def _edit_routes(app, svc: Service, bearer) -> None:
    """POST /v1/edit and POST /v1/refine."""
    from fastapi import Depends, Query, Request
    from fastapi.security import HTTPAuthorizationCredentials

    @app.post("/v1/edit", openapi_extra=_openapi_body(svc.base), summary="Edit a picture as an instruction says",
              responses=EDIT_RESPONSES)
    async def edit(request: Request, format: str | None = Query(None, description="png (the default) or json; "
                                                                 "without it, Accept: application/json asks for JSON"),
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        return await respond(lambda: svc.edit(request, format, credentials), svc.metrics)

    @app.post("/v1/refine", openapi_extra=_openapi_refine_body(),
              summary="Correct the region of an edit: rerun only its edit pass", responses=REFINE_RESPONSES)
    async def refine(request: Request, format: str | None = Query(None, description="png (the default) or json (its "
                                                                   "answer has a new session id)"),
                     credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        return await respond(lambda: svc.refine(request, format, credentials))


def _read_routes(app, svc: Service, bearer) -> None:
    """The GET routes: health, the model and limits, metrics (those two behind the token), the page, /docs."""
    from fastapi import Depends
    from fastapi.security import HTTPAuthorizationCredentials
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    cfg, metrics, batcher = svc.cfg, svc.metrics, svc.batcher
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    rendered: dict[str, str] = {}

    @app.get("/healthz", summary="Liveness, queue depth, whether a token is needed")
    async def healthz():
        body, status = svc.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models", summary="The model served, its default EditConfig and the server's limits")
    async def models(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        try:
            authorize(cfg.token, credentials)
        except BadRequest as e:
            return _error(e.status, e.message, e.headers)
        return svc.models()

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        try:
            authorize(cfg.token, credentials)
        except BadRequest as e:
            return _error(e.status, e.message, e.headers)
        return PlainTextResponse(metrics.render(batcher.depth, batcher.running), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if "docs" not in rendered:  # after every route is registered; the description never changes
            rendered["docs"] = render_docs(app.openapi())
        return HTMLResponse(rendered["docs"], headers={"Content-Security-Policy": CSP})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it; no content beats a 404 in their console
        return Response(status_code=204)

    @app.get("/static/app.js", include_in_schema=False)
    async def app_js():
        return Response(script, media_type="text/javascript")


def _error(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _error_handlers(app) -> None:
    """Every refusal as a JSON ``{"error": ...}`` body; an unexpected failure as a 500 without a traceback."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # 404, 405, malformed multipart (400), ...
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc: BodyTooLarge):
        return Response(str(exc), status_code=413, media_type="application/json", headers={"Connection": "close"})

    @app.exception_handler(BodyStalled)
    async def stalled(request, exc: BodyStalled):
        return _error(408, str(exc), {"Connection": "close"})

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # the traceback goes to the log, not the client
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")
