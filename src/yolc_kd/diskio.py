"""Every file yolc-kd writes goes through here, so that a failed write (a full disk above all) is one line and
leaves no partial file.

A file is written under a temporary name in its own folder (`.NAME.tmpPID`), flushed to disk and renamed over
NAME; any failure removes the temporary file. An OSError, and torch's RuntimeError from its zip writer (which
carries the OSError as its context), becomes a UserError naming the path, and for a full disk or quota
(ENOSPC, EDQUOT) the free space left on that filesystem:
`cannot write work/iter_3.pth: no space left on device (12 KiB free on /mnt/x)`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Tuple, Union

from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# what torch's zip writer says when a write into its own file stream fails (that path loses the errno)
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "iostream error", "file write failed")
# such a failure with less than this free on the filesystem is taken for a full disk
FULL_BELOW_BYTES = 1 << 20


def temp_name(path: PathLike) -> Path:
    """The temporary name `path` is written under: hidden, in the same folder (so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp{os.getpid()}")


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '0 B', '12 KiB', '1.5 MiB'."""
    value, units = float(n), ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in units:
        if value < 1024 or unit == units[-1]:
            return f"{int(value)} {unit}" if unit == "B" or value >= 100 else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_space(path: PathLike) -> Optional[Tuple[int, Path]]:
    """(bytes free, mount point) of the filesystem that holds `path` (or would hold it), or None when unknown."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return None
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, mount


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """exc itself when it is an OSError, else the first OSError among its causes / contexts."""
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _is_torch_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in TORCH_WRITE_FAILURES)


def describe_os_error(exc: OSError, path: Optional[PathLike] = None, action: Optional[str] = "cannot write",
                      removed: int = 0) -> str:
    """One line for an OSError: `action`, its path (`path`, else the one it names), what went wrong, and for a
    full disk or quota the free space left: 'cannot write x.json: no space left on device (12 KiB free on /mnt)'.
    action=None, for an error whose operation is unknown: 'x.json: permission denied'. `removed`: bytes of the
    partial file deleted after the failure (the free space includes them)."""
    target = path if path is not None else exc.filename
    reason = (exc.strerror or str(exc) or type(exc).__name__).strip()
    reason = reason[:1].lower() + reason[1:]
    if exc.errno in NO_SPACE and target is not None:
        reason += _free_note(target, removed)
    if target is None:
        return reason
    return f"{action} {display_path(target)}: {reason}" if action else f"{display_path(target)}: {reason}"


def _free_note(path: PathLike, removed: int = 0) -> str:
    space = free_space(path)
    if space is None:
        return ""
    after = f", counting the {format_size(removed)} of the removed partial file" if removed > 0 else ""
    return f" ({format_size(space[0])} free on {display_path(space[1])}{after})"


def write_error(path: PathLike, exc: BaseException, free_at_failure: Optional[int] = None,
                removed: int = 0) -> Optional[UserError]:
    """The one-line UserError for a failed write of `path`, or None when exc is no I/O failure (a bug, a
    KeyboardInterrupt: the caller re-raises it). `free_at_failure`: bytes free when the write failed, before the
    partial file (`removed` bytes) was deleted; torch's own writer reports no errno, so little free space then
    means a full disk."""
    if isinstance(exc, UserError):
        return exc
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    os_error = _os_error_in(exc)
    if os_error is not None:
        return UserError(describe_os_error(os_error, path, removed=removed))
    if not _is_torch_write_failure(exc):
        return None
    if free_at_failure is None:
        space = free_space(path)
        free_at_failure = space[0] if space else None
    if free_at_failure is not None and free_at_failure < FULL_BELOW_BYTES:
        return UserError(describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path, removed=removed))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot write {display_path(path)}: torch's writer failed ({first})")


@contextmanager
def write_errors(path: PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into the one-line UserError naming `path` (for writes that are not
    one new file, e.g. a cache shard through zarr, which removes its own temporary file)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = write_error(path, exc)
        if error is None or error is exc:
            raise
        raise error from None


def _remove(path: Path) -> int:
    """Delete a partial file; returns its size (0 when there was none)."""
    try:
        size = path.lstat().st_size
        path.unlink()
        return size
    except OSError:
        return 0  # none, or it cannot go: the write's own error is the one to report


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield the temporary name to write `path` under; after the block it is fsynced and renamed over `path`.
    On any failure the temporary file is removed and an I/O failure becomes one line (write_error)."""
    out = Path(path)
    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException as exc:
        space = free_space(out) if _is_torch_write_failure(exc) else None  # before the clean-up frees space
        removed = _remove(tmp)
        error = write_error(out, exc, space[0] if space else None, removed)
        if error is None or error is exc:
            raise
        raise error from None


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO[Any]]:
    """Yield a file open for writing; after the block the whole file replaces `path` (see atomic_path)."""
    if "w" not in mode:
        raise ValueError(f"atomic_write writes a whole file: mode {mode!r} has no 'w'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh


def write_json(path: PathLike, obj: Any, **dump_args: Any) -> Path:
    """JSON (json.dump's keyword arguments) and a newline, written atomically; returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, **dump_args)
        fh.write("\n")
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """UTF-8 text written atomically; returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def append_text(path: PathLike, text: str) -> None:
    """Append `text` (whole lines) to a log; on failure the file is cut back to where it was, so no partial line
    stays, and the error is one line."""
    path = Path(path)
    data = memoryview(text.encode("utf-8"))
    with write_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:  # unbuffered: a full disk shows here, not at a later flush; a short write is retried
                    data = data[os.write(fd, data):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def replace_symlink(link: PathLike, target: str) -> None:
    """Point `link` at `target` atomically (a temporary link renamed over it)."""
    link = Path(link)
    tmp = temp_name(link)
    try:
        _remove(tmp)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except BaseException as exc:
        _remove(tmp)
        error = write_error(link, exc)
        if error is None or error is exc:
            raise
        raise error from None
