"""Where vitprune may write: checks every command runs on its output path before computing anything.

Rules (README "Errors"): an output is written atomically (a hidden temporary next to it, then renamed);
an input is never overwritten, and nothing is written *into* an input model folder; an existing output is
replaced only with ``--overwrite``, and a folder only if it is a model vitprune saved (it holds the marker
file :data:`MARKER`, listing the files vitprune wrote, and nothing else); a destination that cannot be
written gives one line, before any work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from vitprune.errors import VitpruneError


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (same resolved path, or the same inode through a link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_writable_folder(folder: str | os.PathLike, what: str = "-o", error: type = VitpruneError) -> None:
    """Raise a one-line VitpruneError unless a file can be created in ``folder`` (tried, then removed).

    A trial file is the only reliable test: ``os.access`` says yes to root in a read-only folder, and
    to ``/proc`` or ``/sys``, where creating a file fails.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"the folder {folder} for {what} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitprune-probe-", dir=folder)
    except OSError as exc:
        raise error(f"cannot write to the folder {folder} for {what}: {_reason(exc)}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _inputs(inputs: Iterable[object]) -> list[Path]:
    return [Path(p) for p in inputs
            if isinstance(p, (str, os.PathLike)) and p and not str(p).startswith("timm:") and Path(p).exists()]


def check_output_path(output: str | os.PathLike, inputs: Iterable[object] = (), *, what: str = "-o",
                      overwrite: bool = False, kind: str = "file") -> Path:
    """Check ``output`` before any work: its folder exists and is writable, it is not an input, not inside an
    input folder and does not hold an input; an existing output needs ``overwrite`` (and, for ``kind="model"``,
    must be a folder vitprune saved; for ``kind="file"``, must not be a folder).

    Returns ``output`` as a Path. Raises a one-line VitpruneError otherwise.
    """
    output = Path(output)
    if str(output) in ("", ".") or output.name in ("", ".", ".."):
        raise VitpruneError(f"{what} {str(output)!r} is not a file or folder name")
    res = output.resolve()
    for inp in _inputs(inputs):
        q = inp.resolve()
        if same_file(output, inp) or res == q:
            raise VitpruneError(f"the output {output} is the input {inp}; choose another {what}")
        if q in res.parents:
            raise VitpruneError(f"the output {output} is inside the input {inp}; choose another {what}")
        if res in q.parents:
            raise VitpruneError(f"the output {output} holds the input {inp}; choose another {what}")
    if not output.parent.is_dir():
        raise VitpruneError(f"the folder {output.parent} for {what} does not exist")
    _check_not_in_model_folder(output, what)
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise VitpruneError(f"{output} exists; pass --overwrite to replace it")
        if kind == "file" and output.is_dir():
            raise VitpruneError(f"the output {output} is a folder; {what} takes a file name")
        if kind == "model":
            refuse_unless_replaceable(output)
    check_writable_folder(output.parent, what)
    return output


def _check_not_in_model_folder(output: Path, what: str) -> None:
    """No file is written into a folder vitprune saved a model to (it would no longer be one, or load)."""
    from vitprune.io.save import GRAPH_FILE, MARKER, TENSOR_FILE

    folder = output.resolve().parent
    if (folder / MARKER).is_file() or ((folder / GRAPH_FILE).is_file() and (folder / TENSOR_FILE).is_file()):
        raise VitpruneError(f"the output {output} is inside the model folder {folder}; choose another {what}")


def refuse_unless_replaceable(path: str | os.PathLike, error: type = VitpruneError) -> None:
    """Raise ``error`` unless ``path`` is a folder vitprune saved a model to, holding only the files it wrote:
    every entry a regular file (no folder, no link) that the marker lists."""
    from vitprune.io.save import GRAPH_FILE, written_files

    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise error(f"{path} exists and is not a model saved by vitprune; refusing to replace it")
    files = written_files(path)
    if files is None:
        has = " (it has a graph.json but no vitprune marker)" if (path / GRAPH_FILE).exists() else ""
        raise error(f"{path} exists and is not a model saved by vitprune{has}; refusing to replace it")
    entries = list(os.scandir(path))
    others = sorted(e.name for e in entries if e.name not in files)
    if others:
        raise error(f"{path} holds files vitprune did not write ({', '.join(others[:3])}); "
                            "refusing to replace it")
    # A listed name is not enough: ``graph.json`` could be the user's folder or a link to their file.
    odd = sorted(e.name for e in entries if e.is_symlink() or not e.is_file(follow_symlinks=False))
    if odd:
        raise error(f"{path} holds {odd[0]}, which is a folder or a link, not a file vitprune wrote; "
                    "refusing to replace it")


def clean_stale_temporaries(dest: str | os.PathLike, allowed: Iterable[str] | None = None) -> list[Path]:
    """Remove the hidden temporaries an interrupted write to ``dest`` left next to it (a SIGKILL, a power cut:
    nothing ran to remove them); return what was removed.

    Candidates are ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` (vitprune's names for ``dest`` = ``NAME``) whose
    process is gone, and ``.NAME.tmp-*`` folders without a PID (older vitprune). A folder is removed only if it
    holds nothing but regular files named in ``allowed`` (default: the files a model save writes, and the
    ``NAME`` / ``NAME.data`` an ONNX save stages), a file (:func:`atomic_file`'s) only if it is a regular file
    with a PID.
    """
    from vitprune.io.save import GRAPH_FILE, MARKER, TENSOR_FILE

    dest = Path(dest)
    ours = set(allowed) if allowed is not None else {GRAPH_FILE, TENSOR_FILE, MARKER, dest.name, dest.name + ".data"}
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for e in entries:
        for tag in (f".{dest.name}.tmp-", f".{dest.name}.old-"):
            if not e.name.startswith(tag):
                continue
            pid = e.name[len(tag):].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            try:
                if e.is_file(follow_symlinks=False):
                    if not pid.isdigit():
                        continue  # not a name vitprune gives a file
                    os.unlink(e.path)
                elif not e.is_dir(follow_symlinks=False) or any(
                        f.name not in ours or f.is_symlink() or not f.is_file(follow_symlinks=False)
                        for f in os.scandir(e.path)):
                    continue  # not only the regular files a save writes: not ours to remove
                else:
                    shutil.rmtree(e.path)
                removed.append(Path(e.path))
            except OSError:
                continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier attempt in this process has failed and been cleaned already
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.NAME.tmp-PID-*``); when the block succeeds it becomes ``path``
    in one rename (with a new file's usual mode), otherwise it is removed: a reader never sees a half-written
    file. A temporary a killed earlier write left is removed first (:func:`clean_stale_temporaries`)."""
    path = Path(path)
    clean_stale_temporaries(path)  # what a killed earlier write to ``path`` left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
