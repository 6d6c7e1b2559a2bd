"""``wsiseg view OUT``: the slide and every result of its run in a local web page.

:mod:`wsiseg.viewer.runs` opens run folders read-only, :mod:`wsiseg.viewer.nuclei` indexes the
nucleus outlines, :mod:`wsiseg.viewer.server` serves them with the page in ``static/`` (which
ships OpenSeadragon, BSD-3-Clause, so the page needs no network).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2


def cmd_view(args: argparse.Namespace) -> int:
    # The server's modules import Zarr, OpenSlide and the instance writer's names; imported here so
    # that building the command line for other commands does not pay for them.
    from wsiseg.viewer.runs import ViewerError
    from wsiseg.viewer.server import serve

    if not 0 <= args.port <= 65535:
        print(f"wsiseg: error: --port {args.port} is not a port number (0-65535; 0 picks a free one)", file=sys.stderr)
        return EXIT_USAGE
    try:
        serve(Path(args.out), args.host, args.port, tuple(Path(d) for d in args.slides or ()),
              announce=lambda s: print(s, flush=True))
    except ViewerError as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def add_parser(sub) -> None:
    """Register ``wsiseg view`` on the subparsers of the ``wsiseg`` command line."""
    v = sub.add_parser("view", help="show a slide and its results (maps, nuclei, cellularity) in the browser")
    v.add_argument("out", metavar="OUT", help="a run folder (OUT/<stem>) or the output folder of `wsiseg run`")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--slides", action="append", default=None, metavar="DIR",
                   help="look for input slides in DIR when they are no longer where `wsiseg run` read them; repeatable")
    v.set_defaults(func=cmd_view)
