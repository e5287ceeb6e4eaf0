"""Output paths for the command line: checked before any work starts, written together at the end.

`check_output` refuses, up front, an output that exists (without force), is a directory where a
file is wanted (or a file where a folder is wanted), or lies under a folder that cannot be created
or written; it creates nothing. `commit` writes every output to a temporary file next to its
target and then moves them all into place with SIGINT held off, so an interrupt at any moment
leaves either all outputs or none (and no temporary files, and no new parent folders).
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written."""


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output(path, force: bool, *, folder: bool = False, what: str = "--out") -> Path:
    """Raises OutputError unless `path` can be written (see module docstring). Creates nothing."""
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise OutputError(f"{what}: an output path is needed")
    if path.exists():
        if not force:
            raise OutputError(f"{what} {path} exists; pass --force to overwrite it")
        if path.is_dir() and not folder:
            raise OutputError(f"{what} {path} is a directory; a file is expected")
        if not path.is_dir() and folder:
            raise OutputError(f"{what} {path} is a file; a folder is expected")
    anc = _existing_ancestor(path.parent)
    if not anc.is_dir():
        raise OutputError(f"{what} {path}: {anc} is not a folder")
    try:  # a real probe: os.access says yes to root on read-only mounts and /proc
        with tempfile.TemporaryFile(dir=anc, prefix=".fmn-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in folder {anc} ({e.strerror or e})") from None
    return path


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p path.parent; returns the folders it created, deepest last."""
    created, p = [], path.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    for d in reversed(created):
        d.mkdir()
    return list(reversed(created))


@contextmanager
def _no_sigint():
    """SIGINT is held (delivered right after) while the block runs, in the main thread."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, ValueError, OSError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _normal_mode(path: Path, folder: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)  # mkstemp/mkdtemp make 0600/0700


def commit(outputs, force: bool = False) -> None:
    """outputs: [(path, write(tmp_path), is_folder)]. Writes each to a temporary sibling, then moves
    all into place at once; on any failure or interrupt nothing new is left behind."""
    made_dirs, temps = [], []
    try:
        for path, write, folder in outputs:
            path = Path(path)
            made_dirs += _make_parents(path)
            if folder:
                tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
            else:
                # the target's suffix last, so that writers that go by it (PIL) still do
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
                os.close(fd)
                tmp = Path(name)
            temps.append(tmp)
            write(tmp)
            _normal_mode(tmp, folder)
        with _no_sigint():
            for (path, _, folder), tmp in zip(outputs, temps):
                path = Path(path)
                if folder and path.exists() and force:
                    shutil.rmtree(path)
                os.replace(tmp, path)
            temps = []
    except BaseException:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
