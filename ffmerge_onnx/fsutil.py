"""Output safety, one mechanism for every command: refuse targets that touch an input, hold a lock on
the target for the whole run, write into a temporary folder beside it and move it into place at the
end with a final no-replace check. Nothing is left behind on failure, Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError, OutputBusyError, OutputExistsError

NAME_MAX = 255
_held: dict[Path, int] = {}  # target -> nesting depth of this process's lock on it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock_path(target: Path) -> Path:
    digest = hashlib.sha256(target.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return target.parent / f".ffmerge-lock-{digest}"


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_target(target: Path, overwrite: bool, inputs: Iterable[Path | str | None] = (), option: str = "-o") -> Path:
    """The resolved target, or a typed error: it exists (without overwrite), is, contains or lies inside
    an input, or holds the current folder."""
    target = Path(target).expanduser().resolve()
    if target == Path(target.anchor) or not target.name:
        raise InputError(f"Refusing to write to {target}; choose another {option}.")
    if len(target.name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise InputError(
            f"{option} {target.name[:40]}... is longer than {NAME_MAX} bytes, the most a file name may have."
        )
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a hub id, or nothing given
        src = Path(given).expanduser().resolve()
        if _inside(src, target):
            raise InputError(f"{option} {target} is or contains the input {src}; choose an output outside it.")
        if _inside(target, src):
            raise InputError(f"{option} {target} lies inside the input {src}; choose an output outside it.")
    if _inside(Path.cwd().resolve(), target):
        raise InputError(f"{option} {target} is or holds the current folder; choose another path.")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{target} already exists. Choose another -o or pass --overwrite.")
    return target


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            _remove_empty(missing)
            raise InputError(f"Cannot create {p} ({e.strerror}); choose another -o.") from e
    return missing


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on `target` for this process (re-entrant), in a lock file beside it."""
    target = Path(target).resolve()
    if target in _held:
        _held[target] += 1
        try:
            yield
        finally:
            _held[target] -= 1
        return
    created = _make_parents(target.parent)
    lock = _lock_path(target)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_empty(created)
        raise InputError(f"Cannot write in {target.parent} ({e.strerror}); choose another -o.") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise OutputBusyError(
                f"Another ffmerge-onnx run is writing {target} (it holds {lock.name}); wait for it or choose another -o."
            ) from e
        if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:  # removed by the run we waited on
            raise OutputBusyError(f"Another ffmerge-onnx run just finished writing {target}; run again.")
        _held[target] = 1
        try:
            yield
        finally:
            del _held[target]
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)
        if not target.exists():
            _remove_empty(created)


@contextlib.contextmanager
def guarded_output(
    target, overwrite: bool = False, inputs: Iterable[Path | str | None] = (), lock: bool = True
) -> Iterator[Path]:
    """A whole command's hold on its output: checks first, then the lock until the end (`lock` False: the
    checks alone, for processes that will not write, such as torchrun's ranks above 0)."""
    resolved = check_target(target, overwrite, inputs)
    if not lock:
        yield resolved
        return
    with output_lock(resolved):
        yield resolved


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst, failing with FileExistsError if dst appeared (renameat2 where the kernel has it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def place(src: Path, target: Path, overwrite: bool) -> None:
    """Move a finished output into place; with overwrite the old one goes, without it nothing is replaced."""
    if not (target.exists() or target.is_symlink()):
        try:
            _rename_noreplace(src, target)
            return
        except FileExistsError:
            if not overwrite:
                raise OutputExistsError(
                    f"{target} appeared while this run was working; nothing was replaced. Choose another -o."
                ) from None
    elif not overwrite:
        raise OutputExistsError(f"{target} appeared while this run was working; nothing was replaced.")
    old = target.with_name(f".ffmerge-old-{src.name[-8:]}")
    target.rename(old)
    try:
        src.rename(target)
    except BaseException:
        old.rename(target)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `target`, on any failure it vanishes."""
    target = Path(target).expanduser().resolve()
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{target} already exists. Choose another -o or pass --overwrite.")
    with output_lock(target):
        tmp = Path(tempfile.mkdtemp(prefix=".ffmerge-tmp-", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual permissions
        try:
            yield tmp
            place(tmp, target, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_report(path, inputs: Iterable[Path | str | None] = ()) -> Path:
    """Where a report file (--json) may go: not onto or inside an input, not a folder."""
    target = check_target(path, overwrite=True, inputs=inputs, option="--json")
    if target.is_dir():
        raise InputError(f"--json {target} is a folder; give a file path.")
    return target


def write_text(path, text: str, inputs: Iterable[Path | str | None] = ()) -> Path:
    """A report file, replaced atomically."""
    target = check_report(path, inputs)
    with output_lock(target):
        fd, tmp = tempfile.mkstemp(prefix=".ffmerge-tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return target
