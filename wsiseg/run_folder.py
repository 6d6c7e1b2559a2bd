"""The run folder ``OUT/<stem>/``: the names wsiseg writes there, its lock and its state.

wsiseg owns a run folder only as far as its own names go. A folder that holds anything else,
or the input itself, is refused (never cleared), and ``--overwrite`` removes wsiseg's own files
only. One run at a time holds a folder: an exclusive ``flock`` on ``.wsiseg.lock`` inside it,
which the operating system releases when the process ends, however it ends (``kill -9``
included). Each store gets a run id when it is created (in ``progress.json``); ``summary.json``
counts as complete only with the run id of the store it describes, and a run refuses to record
progress in, mark complete or summarise a store that another run has since re-created.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from wsiseg.slide import SlideError

LOCK_NAME = ".wsiseg.lock"
SPILL_PREFIX = "wsiseg-blend-"  # the blender's spill folders (see wsiseg.blend.ChunkBlender)
STORE_NAME = "probabilities.zarr"
# Every file that a run (its stages included) writes directly in a run folder.
OUTPUT_NAMES = frozenset({
    STORE_NAME, "summary.json", "summary.json.tmp", "progress.json", "progress.json.tmp",
    "thumbnail.png", "tissue.png", "cellularity.csv", "cellularity.csv.tmp", "cellularity.parquet",
    "heatmap.png", "nuclei.geojson", "nuclei.geojson.tmp", "nuclei.csv", "nuclei.csv.tmp",
    "nuclei.parquet", "nuclei.parquet.tmp", LOCK_NAME,
})
_OWN_PATTERN = re.compile(r"progress-bands-\d+-\d+\.json(\.tmp)?")  # wsiseg.cluster's band ranges
_STORE_ENTRY = re.compile(r"\d+|labels|\.zgroup|\.zattrs|\.zmetadata")  # the top of an OME-Zarr store
_SPILL_DIR = re.compile(re.escape(SPILL_PREFIX) + r"[A-Za-z0-9_]{8}")  # tempfile.mkdtemp's names
_SPILL_ENTRY = re.compile(r"\d+-\d+\.f32")  # one spilled block each


class RunFolderError(SlideError):
    """An output folder that a run must not write to as it is; the message says why and what to do."""


def is_own(entry: Path) -> bool:
    """Whether ``entry`` (in a run folder) is something wsiseg writes: one of its names, of the
    kind it writes (a file, or a folder for the store and the spill folders), never a symlink."""
    name = entry.name
    if entry.is_symlink():
        return False
    if name == STORE_NAME:
        return entry.is_dir() and all(_STORE_ENTRY.fullmatch(p.name) for p in entry.iterdir())
    if name.startswith(SPILL_PREFIX):  # only a folder the blender made, holding only its blocks
        return bool(_SPILL_DIR.fullmatch(name)) and entry.is_dir() and \
            all(_SPILL_ENTRY.fullmatch(p.name) and p.is_file() and not p.is_symlink() for p in entry.iterdir())
    return (name in OUTPUT_NAMES or bool(_OWN_PATTERN.fullmatch(name))) and entry.is_file()


def _listing(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class RunFolder:
    """``OUT/<stem>/`` of one input (``source``)."""

    def __init__(self, path: str | Path, source: str | Path):
        self.path = Path(path)
        self.source = Path(source)

    def check(self) -> None:
        """Refuse (:class:`RunFolderError`) a folder that is not wsiseg's to write: a file in
        its place, a folder that holds the input, or one with anything wsiseg did not write."""
        p, src = self.path, self.source
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{src}: the output {p} exists and is not a folder: move it away or give -o "
                                 "another folder")
        if not p.is_dir():
            return
        root = p.resolve()
        for s in (src.absolute(), src.resolve()):
            if root == s or root in s.parents:
                raise RunFolderError(
                    f"{src}: the output folder {p} holds the input itself; wsiseg writes each input to "
                    "OUT/<stem>/ and keeps nothing else there: give -o another folder (e.g. -o wsiseg-out)")
        foreign = sorted(e.name for e in p.iterdir() if not is_own(e))
        if foreign:
            raise RunFolderError(
                f"{src}: the output folder {p} holds files that wsiseg did not write ({_listing(foreign)}); "
                "wsiseg neither mixes its output with them nor removes them (not even with --overwrite): "
                "move them away or give -o another folder")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder (created if need be) for this process; refuse (:class:`RunFolderError`,
        naming the holder's PID) while another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderError(
                    f"{self.source}: the output folder {self.path} is in use by another wsiseg run "
                    f"({_holder(fd)}); wait for it to end, or stop it, then run again (a stopped run "
                    "resumes)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def clear(self) -> None:
        """Remove what wsiseg wrote (the lock file aside); anything else stays."""
        for e in self.path.iterdir() if self.path.is_dir() else ():
            if e.name == LOCK_NAME or not is_own(e):
                continue
            if e.is_dir():
                shutil.rmtree(e)
            else:
                e.unlink()

    def remove_spill(self) -> None:
        """Remove spill folders left by a run that was killed (they hold nothing a resume uses)."""
        for e in self.path.glob(SPILL_PREFIX + "*"):
            if is_own(e):
                shutil.rmtree(e, ignore_errors=True)

    def state(self, params: dict) -> tuple[str, int]:
        """('complete' | 'partial' | 'none' | 'mismatch' | 'stale', bands_done) of a folder that
        :meth:`check` accepted. 'mismatch': output of other parameters; 'stale': a summary that is
        not the store's (another run re-created the store after it began)."""
        summary, progress = self.path / "summary.json", self.path / "progress.json"
        if not progress.exists() or not (self.path / STORE_NAME).exists():
            return "none", 0  # (a run killed before its first progress record)
        try:
            prog = json.loads(progress.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return "mismatch", 0
        if prog.get("params") != params:
            return "mismatch", 0
        bands = int(prog.get("bands_done", 0))
        if summary.exists():
            try:
                s = json.loads(summary.read_text())
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                s = {}
            if s.get("run_id") != prog.get("run_id"):
                return "stale", 0
            if s.get("complete"):
                return "complete", bands
        return "partial", bands


def _holder(fd: int) -> str:
    """'PID n on HOST' from a held lock file (the holder writes it just after locking)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict) and "pid" in info:
            return f"PID {info['pid']} on {info.get('host', 'this host')}"
        time.sleep(0.05)
    return "PID unknown"


def check_owner(progress_path: Path, run_id: str | None, must_exist: bool = True) -> None:
    """Raise :class:`RunFolderError` unless ``progress_path`` still belongs to run ``run_id``:
    another run that re-created the store has removed it or written its own id there. (A
    missing file is fine where ``must_exist`` is False, e.g. a band range's first record.)"""
    if run_id is None:
        return
    try:
        found = json.loads(progress_path.read_text()).get("run_id")
    except FileNotFoundError:
        found = "missing" if must_exist else None
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        found = "unreadable"
    if found is not None and found != run_id:
        raise RunFolderError(f"{progress_path.parent}: another run re-created this output while this one was "
                             "writing it; this run stops without marking it complete: run the command again")
