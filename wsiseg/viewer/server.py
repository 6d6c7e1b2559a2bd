"""The viewer's HTTP server: the standard library's threading server, GET only, read-only.

Routes (``RUN`` is a run folder's name, URL-quoted; coordinates in slide level-0 px):

==========================================  ====================================================
``/``, ``/static/PATH``                     the page and its files (``wsiseg/viewer/static``)
``/api/runs``                               the runs: ``[{"name": ..., "input": ...}]``
``/api/colormaps``                          256 RGB entries per colour map (JSON)
``/api/runs/RUN/info``                      sizes, channels, nucleus types, summary (JSON)
``/api/runs/RUN/slide.dzi``                 the slide's Deep Zoom descriptor
``/api/runs/RUN/slide_files/L/C_R.jpeg``    a deep-zoom tile of the slide
``/api/runs/RUN/map/CH/K/C_R.png?cmap=M``   probability channel CH, pyramid level K, tile (C, R)
                                            of ``MAP_TILE`` px of that level, colour-mapped
``/api/runs/RUN/at?x=X&y=Y``                the read-out at a point (JSON)
``/api/runs/RUN/nuclei?box=X0,Y0,X1,Y1``    nucleus outlines meeting a box (JSON)
``/api/runs/RUN/cellularity``               the cellularity windows (JSON)
``/files/PATH``                             a file under OUT (paths that leave OUT: 403)
==========================================  ====================================================

The server keeps no writable state: everything it serves is read from OUT, the slides and the
package, and nothing is written anywhere.
"""
from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
import re
import shutil
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from wsiseg.viewer.runs import COLORMAPS, Run, ViewerError, colormap_lut, open_runs

STATIC = Path(__file__).resolve().parent / "static"
MAX_OUTLINES = 30000  # nuclei per outline request; a box holding more gets none (zoom in)
log = logging.getLogger("wsiseg.viewer")


class Forbidden(Exception):
    """A path that leaves its root."""


def safe_file(root: Path, rel: str) -> Path | None:
    """The file ``rel`` (URL-decoded, '/'-separated) under ``root``, or None if there is none.
    Raises :class:`Forbidden` for an absolute path, a ``..`` segment, a backslash or NUL, or a
    link that resolves outside ``root``."""
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or re.match(r"^[A-Za-z]:", rel):
        raise Forbidden(rel)
    parts = rel.split("/")
    if any(p == ".." for p in parts):
        raise Forbidden(rel)
    root = root.resolve()
    path = root.joinpath(*[p for p in parts if p not in ("", ".")]).resolve()
    if not path.is_relative_to(root):
        raise Forbidden(rel)
    return path if path.is_file() else None


class ViewerServer(ThreadingHTTPServer):
    """Serves the runs under ``out`` (see :func:`wsiseg.viewer.runs.open_runs`) at ``host:port``
    (port 0: a free one). ``url`` is the page's address."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, out: Path, host: str = "127.0.0.1", port: int = 8000, slide_dirs: tuple[Path, ...] = ()):
        self.out = Path(out)
        self.runs, self.warnings = open_runs(self.out, slide_dirs)
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)  # on failure it calls server_close(), closing the runs
        # Read the outlines in the background: a large nuclei.geojson takes a while, the page's first
        # request for a run waits for it.
        threading.Thread(target=lambda: [r.nuclei for r in self.runs.values()], name="wsiseg-nuclei", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        for run in self.runs.values():
            run.close()

    def start_thread(self) -> threading.Thread:
        """Serve in a daemon thread (tests, scripts); stop with ``shutdown()`` then ``server_close()``."""
        t = threading.Thread(target=self.serve_forever, name="wsiseg-viewer", daemon=True)
        t.start()
        return t


def _num(q: dict, key: str) -> float:
    v = float(q[key][0])
    if not math.isfinite(v):
        raise ValueError(key)
    return v


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle keep-alive connection is held
    server_version = "wsiseg-view"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-cache") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _file(self, path: Path | None, cache: str = "no-cache") -> None:
        """A file, streamed (a GeoJSON can be large)."""
        if path is None:
            self._error(404, "not found")
            return
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        with open(path, "rb") as f:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("Cache-Control", cache)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        url = urlsplit(self.path)
        try:
            self._route(url.path, parse_qs(url.query))
        except Forbidden:
            self._error(403, "forbidden: the path leaves the served folder")
        except (KeyError, ValueError, IndexError) as e:  # a missing or malformed query parameter
            self._error(400, f"bad request: {type(e).__name__}: {e}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a failure while serving one request must not stop the server
            log.warning("wsiseg view: %s failed: %s: %s", self.path, type(e).__name__, e)
            self._error(500, f"{type(e).__name__}: {e}")

    def _route(self, path: str, q: dict) -> None:
        if path in ("/", "/index.html"):
            self._file(STATIC / "index.html")
        elif path.startswith("/static/"):
            self._file(safe_file(STATIC, unquote(path[len("/static/"):])), cache="max-age=3600")
        elif path.startswith("/files/"):
            self._file(safe_file(self.server.out, unquote(path[len("/files/"):])))
        elif path == "/api/colormaps":
            self._json({n: colormap_lut(n, (0, 0, 0))[:, :3].tolist() for n in COLORMAPS if n != "channel"})
        elif path == "/api/runs":
            self._json([{"name": n, "input": r.input_name} for n, r in self.server.runs.items()])
        elif path.startswith("/api/runs/"):
            name, _, rest = path[len("/api/runs/"):].partition("/")
            run = self.server.runs.get(unquote(name))
            if run is None:
                self._error(404, f"no run {unquote(name)!r}")
            else:
                self._run_route(run, rest, q)
        else:
            self._error(404, "not found")

    def _run_route(self, run: Run, rest: str, q: dict) -> None:
        if rest == "info":
            info = run.info()
            base = run.folder.resolve().relative_to(self.server.out.resolve())  # run folders lie in OUT
            info["files"] = {p.name: "/files/" + quote((base / p.name).as_posix())
                             for p in sorted(run.folder.iterdir()) if p.is_file()}
            self._json(info)
        elif rest == "slide.dzi":
            if run.slide is None:
                self._error(404, run.slide_note)
            else:
                self._send(200, run.slide.dzi().encode(), "application/xml; charset=utf-8")
        elif m := re.fullmatch(r"slide_files/(\d+)/(\d+)_(\d+)\.jpeg", rest):
            if run.slide is None:
                self._error(404, run.slide_note)
                return
            try:
                body = run.slide.tile(*map(int, m.groups()))
            except ValueError as e:
                self._error(404, str(e))
                return
            self._send(200, body, "image/jpeg", cache="max-age=600")
        elif m := re.fullmatch(r"map/(\d+)/(\d+)/(\d+)_(\d+)\.png", rest):
            try:
                body = run.map_tile_png(*map(int, m.groups()), cmap=q.get("cmap", ["channel"])[0])
            except ValueError as e:
                self._error(404, str(e))
                return
            self._send(200, body, "image/png", cache="max-age=600")
        elif rest == "at":
            self._json(run.at(_num(q, "x"), _num(q, "y")))
        elif rest == "nuclei":
            x0, y0, x1, y1 = (float(v) for v in q["box"][0].split(","))
            self._json(run.outlines(x0, y0, x1, y1, MAX_OUTLINES))
        elif rest == "cellularity":
            self._json(run.cellularity.as_json() if run.cellularity else None)
        else:
            self._error(404, "not found")


def serve(out: Path, host: str, port: int, slide_dirs: tuple[Path, ...] = (), announce=print) -> None:
    """Serve until Ctrl-C or SIGTERM. Raises :class:`ViewerError` for a missing OUT, one without runs, or an
    address that cannot be bound."""
    try:
        server = ViewerServer(out, host, port, slide_dirs)
    except OSError as e:
        raise ViewerError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                          "(0 picks a free one)") from None
    for w in server.warnings:
        announce(f"wsiseg view: warning: {w}")
    n = len(server.runs)
    announce(f"wsiseg view: {n} run{'s' if n != 1 else ''} from {out} at {server.url} (Ctrl-C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"wsiseg view: warning: listening on {host}: other machines can read these results")
    def stop(signum, frame):  # SIGTERM (kill, a service manager) ends it like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    announce("wsiseg view: stopped")
