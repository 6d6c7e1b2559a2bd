"""The inputs of a command: files and folders expanded to slides and images, their output names,
and the exit code of a batch in which some inputs failed."""
from __future__ import annotations

import sys
from pathlib import Path

from wsiseg.slide import INPUT_SUFFIXES, link_problem

EXIT_OK, EXIT_FAILED = 0, 1

__all__ = ["EXIT_FAILED", "EXIT_OK", "expand_inputs", "failed_code", "out_names"]


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given; folders expand to the slides and images directly inside them. A link in
    a folder that cannot be followed is an error: any loop, and a broken link with a slide's or
    image's suffix."""
    files, errors = [], []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found, bad = [], []
            for f in sorted(p.iterdir()):
                problem = link_problem(f)
                if problem is not None:
                    if problem[0] == "loop" or f.suffix.lower() in INPUT_SUFFIXES:
                        bad.append(problem[1])
                elif f.is_file() and f.suffix.lower() in INPUT_SUFFIXES:
                    found.append(f)
            errors.extend(bad)
            if not found and not bad:
                errors.append(f"{p}: folder holds no slides or images ({', '.join(sorted(INPUT_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(p)
    return files, errors


def out_names(files: list[Path]) -> list[str]:
    """Output folder names: the file stem, made unique with the parent folder's name if needed."""
    stems = [f.name.split(".")[0] if f.name.lower().endswith((".ome.tif", ".ome.tiff")) else f.stem for f in files]
    names = []
    for f, s in zip(files, stems):
        names.append(s if stems.count(s) == 1 else f"{f.parent.name}_{s}")
    return names


def failed_code(failed: int) -> int:
    """The exit code of a batch with ``failed`` inputs that failed (and a line saying so)."""
    if failed:
        print(f"wsiseg: {failed} input(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
