"""``lime-fast serve``: the subcommand's options and its handler (registered by ``lime_fast.cli``)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from ..config import DEFAULT_MODEL
from . import EXTRA_HINT

TOKEN_ENV = "LIME_FAST_TOKEN"


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="an HTTP editing service with dynamic batching, and a page at / (needs the serve extra)",
        description="Serve LIME edits over HTTP: POST /v1/edit (multipart: image, instruction, optional mask and "
        "EditConfig fields), POST /v1/refine (correct an edit's region: only its edit pass runs again), "
        "GET /healthz, /v1/models, /metrics, the page at / and the API docs at /docs. "
        "Requests that arrive within --batch-window-ms and share the working size and settings run as one UNet batch.")
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local diffusers folder, or shapes-ip2p (ships with lime_fast, offline); default {DEFAULT_MODEL}")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="most edits per UNet batch (1 = no batching; default 8)")
    s.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests after its first one (default 10)")
    s.add_argument("--max-queue", type=int, default=256, help="most waiting edits; more get 503 + Retry-After (default 256)")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds before a request gets 504 (default 300)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    s.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest picture, width x height (default 4096 x 4096)")
    s.add_argument("--max-steps", type=int, default=100, help="largest 'steps' a request may ask for (default 100)")
    s.add_argument("--max-queue-mb", type=float, default=1024.0,
                   help="most MiB of decoded pictures waiting; more get 503 + Retry-After (default 1024)")
    s.add_argument("--rate-limit", type=float, metavar="PER_MINUTE",
                   help="most edits per minute per client address; more get 429 (default: no limit; behind a "
                        "reverse proxy, limit there)")
    s.add_argument("--grace", type=float, default=30.0,
                   help="seconds running edits may take to finish after SIGTERM / Ctrl-C; queued ones get 503 at "
                        "once (default 30)")
    s.add_argument("--max-connections", type=int,
                   help="most open connections (default 1000, always below the open-file limit)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="close a connection whose request headers have not arrived in this many seconds (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="answer 408 when the request body stalls this many seconds (default 30)")
    s.add_argument("--sessions", type=int, default=16,
                   help="most edits kept for POST /v1/refine (each JSON answer keeps its edit's encoding and noise on "
                        "the device; the least recently used goes first; 0 keeps none; default 16)")
    s.add_argument("--session-mb", type=float, default=256.0,
                   help="most MiB of device memory the kept edits may hold together (default 256)")
    s.add_argument("--session-ttl", type=float, default=600.0,
                   help="seconds a kept edit lives after its last use (default 600)")
    s.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' on /v1/* and /metrics (or set {TOKEN_ENV}, "
                                   "which, unlike an argument, other users of the machine cannot see)")
    s.add_argument("--device", help="cuda, cpu, cuda:1, ...; several comma-separated (cuda:0,cuda:1) run one engine "
                                    "and one batch worker each (default: cuda when available)")
    s.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args) -> int:
    """Check the options, load the model once per device, and serve until interrupted."""
    from .app import ServeConfig

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if not args.max_upload_mb > 0:
        raise ValueError("--max-upload-mb must be > 0")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    cfg = ServeConfig(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                      timeout_s=args.timeout, max_upload_bytes=int(args.max_upload_mb * 2**20),
                      max_pixels=args.max_pixels, max_steps=args.max_steps, token=token, model_name=args.model,
                      max_queue_mb=args.max_queue_mb, rate_limit=args.rate_limit, grace_s=args.grace,
                      max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                      body_timeout_s=args.body_timeout, max_sessions=args.sessions, session_mb=args.session_mb,
                      session_ttl_s=args.session_ttl)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"lime-fast serve needs {e.name}, which is not installed: {EXTRA_HINT}") from None
    _check_bindable(args.host, args.port)  # before the model loads, which takes a while
    if not _loopback(args.host) and token is None:
        print(f"warning: serving on {args.host} without a token: anyone who can reach this port can run edits "
              f"(set {TOKEN_ENV} or --token)", file=sys.stderr)
    import torch

    from .app import create_app
    from .server import connection_cap, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d.strip() for d in args.device.split(",") if d.strip()] if args.device else [None]
    app = create_app(args.model, cfg, device=devices, torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    batcher = app.state.batcher
    where = ", ".join(str(e.device) for e in batcher.engines)
    print(f"lime-fast serve: {args.model} on {where}; max batch {cfg.max_batch}, window {cfg.batch_window_ms:g} ms, "
          f"queue {cfg.max_queue}, at most {connection_cap(cfg.max_connections)[0]} connections"
          f"{', token required' if token else ''}\n"
          f"  page: http://{_url_host(args.host)}:{args.port}/   API docs: http://{_url_host(args.host)}:{args.port}/docs",
          file=sys.stderr, flush=True)
    serve(app, args.host, args.port, log_level=args.log_level)  # returns after a drained shutdown
    print("lime-fast serve: stopped", file=sys.stderr)
    return 0


def _check_bindable(host: str, port: int) -> None:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
