"""Output files: staged (temp + rename) writes, output checks (regular files, never an input), temp-file cleanup."""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import SurgeonError, WriteError

# Temp files are named .<output>.sdsurgeon-<host>-<pid>-<random>.tmp: recognisably ours, with the owner
# process, so a later run can remove those whose owner died (SIGKILL) and never another's.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP = re.compile(r"^\..+\.sdsurgeon-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[a-z0-9_]{8}\.tmp$")
_live: set[str] = set()  # this process's temp files, removed on SIGTERM
_on_signal_hooks: list[Callable[[], None]] = []
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# --- output checks -----------------------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)  # follows links: what a write through this path would reach
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # a NUL byte in the name
        raise WriteError(f"cannot write {str(path)!r}: the name holds a NUL byte") from None
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a FIFO", ...); None otherwise."""
    st = _stat(Path(path))
    if st is None or stat.S_ISREG(st.st_mode):
        return None
    return next((what for test, what in _KINDS if test(st.st_mode)), "not a regular file")


def _input_identities(inputs: Iterable[str | os.PathLike | None]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> input path of every input file, a folder's files included."""
    ids: dict[tuple[int, int], Path] = {}
    for i in inputs:
        if i is None:
            continue
        path = Path(i)
        st = _stat(path)
        if st is None:
            continue
        ids[(st.st_dev, st.st_ino)] = path
        if stat.S_ISDIR(st.st_mode):  # a transformers folder: every file in it is an input
            for n, inner in enumerate(path.rglob("*")):
                if n > 10_000:
                    break
                with contextlib.suppress(OSError):
                    s = inner.stat()
                    ids[(s.st_dev, s.st_ino)] = inner
    return ids


class InputSet:
    """Inputs that outputs are checked against, each input's identity worked out once.

    ``output_problem`` takes one where many outputs meet the same inputs (a batch: every job's outputs
    against every job's inputs), so the check costs one pass over the inputs, not one per output.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike | None]) -> None:
        self.paths = [i for i in inputs if i is not None]
        self._real: dict[str, str | os.PathLike] = {}  # real path -> the first input spelled to reach it
        for i in self.paths:
            self._real.setdefault(os.path.realpath(i), i)
        self._sorted = sorted(self._real)
        self._ids: dict[tuple[int, int], Path] | None = None  # stat'ed only once an output exists

    def at(self, real: str) -> str | os.PathLike | None:
        """The input whose real path is ``real``."""
        return self._real.get(real)

    def inside(self, real_folder: str) -> str | os.PathLike | None:
        """An input inside the folder whose real path is ``real_folder``."""
        prefix = real_folder + os.sep
        n = bisect.bisect_left(self._sorted, prefix)  # paths under the folder sort right after its prefix
        return self._real[self._sorted[n]] if n < len(self._sorted) and self._sorted[n].startswith(prefix) else None

    def same_file(self, st: os.stat_result) -> Path | None:
        """The input that is the file ``st`` describes (a hard link, a file in an input folder)."""
        if self._ids is None:
            self._ids = _input_identities(self.paths)
        return self._ids.get((st.st_dev, st.st_ino))


def output_problem(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] | InputSet,
                   folder: bool = False) -> str | None:
    """Why ``output`` may not be written, or None: it exists and is not a regular file (``folder``: not a
    folder), or it is an input.

    An input is matched by path and by inode, so another spelling, a symbolic or a hard link of an
    input, or a file inside an input folder, all count; an output folder may not hold an input either.
    ``inputs`` may be an InputSet, made once for many outputs.
    """
    output = Path(output)
    known = inputs if isinstance(inputs, InputSet) else InputSet(inputs)
    kind = not_regular(output)
    if folder:
        real = os.path.realpath(output)
        if output.is_file():
            return f"{output}: it is a file; give a folder name"
        inside = known.inside(real)
        if inside is not None:
            return f"{output} holds the input {inside}; sdsurgeon never overwrites its input"
        kind = None if kind == "a folder" else kind
    elif kind == "a folder":
        return f"{output}: it is a folder; give a file name"
    if kind:
        return f"{output}: it is {kind}, not a regular file; sdsurgeon writes regular files only"
    same = known.at(os.path.realpath(output))
    if same is not None:
        return f"{output} is the input {same}; sdsurgeon never overwrites its input"
    st = _stat(output)
    if st is not None:
        same = known.same_file(st)
        if same is not None:
            return f"{output} is the input {same} (the same file); sdsurgeon never overwrites its input"
    return None


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike | None, option: str = "-o",
                 folder: bool = False) -> Path:
    """Refuse an output path that is one of the inputs or not a regular file (``folder``: not a folder);
    returns it as a Path."""
    problem = output_problem(output, inputs, folder)
    if problem:
        raise WriteError(f"output {problem}; choose another {option}")
    return Path(output)


# --- staged writes -----------------------------------------------------------------------------------

# Write failures the user fixes (not bugs), and what to do about each.
_WRITE_FAILURES = {
    errno.ENOSPC: "free space or choose another output with -o",
    errno.EDQUOT: "free space (or raise the quota) or choose another output with -o",
    errno.EFBIG: "choose another output with -o on a filesystem that takes larger files, or raise ulimit -f",
    errno.EIO: "check the disk, or choose another output with -o",
    errno.EROFS: "choose another output with -o on a writable filesystem",
}
_FULL_BELOW = 1 << 20  # bytes free: a write that failed with less left than this failed on a full disk
_outputs: dict[str, Path] = {}  # staged temp path -> the output it becomes, to name in errors


def failed_write(exc: BaseException, folder: str | os.PathLike) -> int | None:
    """The errno of the failed write behind ``exc`` (a full disk, a quota, a file too large, an I/O error, a
    read-only filesystem), or None when ``exc`` is anything else: a SurgeonError stays as it is, a bug keeps
    its traceback.

    Libraries wrap the OS error (torch's zip writer raises RuntimeError with it as the context, safetensors
    quotes it in its message); a library error that carries none counts only if ``folder``'s filesystem is
    full now (checked before the temp file goes).
    """
    if isinstance(exc, SurgeonError):
        return None
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
            return e.errno
        text = str(e)
        code = next((n for n in _WRITE_FAILURES if os.strerror(n) in text), None)
        if code is not None:
            return code
        todo += [e.__cause__, e.__context__]
    library = type(exc).__module__ != "builtins" or isinstance(exc, (OSError, RuntimeError))
    return errno.ENOSPC if library and _full(folder) else None


def _full(folder: str | os.PathLike) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize < _FULL_BELOW or (st.f_files > 0 and st.f_favail == 0)


def _write_error(output: Path, code: int) -> WriteError:
    what = f"cannot write {output}: {os.strerror(code)}"
    return WriteError(f"{what}; {_WRITE_FAILURES[code]}", what=what, where=str(output), hint=_WRITE_FAILURES[code])


def output_of(dest: str | os.PathLike) -> Path:
    """The output a staged temp path (or a file inside a staged folder) stands for; ``dest`` itself otherwise."""
    full = Path(os.path.abspath(dest))
    return next((_outputs[str(p)] for p in (full, *full.parents) if str(p) in _outputs), Path(dest))


@contextlib.contextmanager
def writing(dest: str | os.PathLike) -> Iterator[None]:
    """Around a library's own write into ``dest`` (a staged temp path): a failed write becomes one WriteError
    naming the output, even where another output's ``staged`` block is the first to see it."""
    try:
        yield
    except Exception as exc:
        code = failed_write(exc, Path(dest).parent)
        if code is None:
            raise
        raise _write_error(output_of(dest), code) from None


def _check_destination(path: Path) -> None:
    kind = not_regular(path)
    if kind == "a folder":
        raise WriteError(f"cannot write {path}: it is a folder; give a file name with -o")
    if kind:
        raise WriteError(f"cannot write {path}: it is {kind}, not a regular file; sdsurgeon replaces regular "
                         "files only: choose another output with -o")
    if not path.parent.is_dir():
        raise WriteError(f"cannot write {path}: folder {path.parent} does not exist")


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path in ``path``'s folder, renamed to ``path`` only if the block succeeds.

    Readers never see a partial file, and a failure (a write error, a failed check, SIGTERM) leaves
    none; a write the disk refuses (full, quota, too large, read-only) is one WriteError naming ``path``.
    Stale temp files of earlier runs killed outright are swept from the folder first.
    """
    path = Path(path)
    _check_destination(path)
    sweep(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.sdsurgeon-{_HOST}-{os.getpid()}-",
                                   suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}; choose another output with -o") from None
    os.close(fd)
    _live.add(tmp)
    _outputs[os.path.abspath(tmp)] = path
    try:
        with writing(tmp):  # a full disk: one WriteError naming the output (checked while the temp file is there)
            yield Path(tmp)
            _check_destination(path)  # a FIFO or a folder may have appeared there meanwhile
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _live.discard(tmp)
        _outputs.pop(os.path.abspath(tmp), None)


def _temp_folder(path: Path) -> str:
    """A new temp folder beside ``path``, named for it (swept when its owner dies, removed on SIGTERM)."""
    sweep(path.parent)
    try:
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.sdsurgeon-{_HOST}-{os.getpid()}-", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}; choose another output with -o") from None
    _live.add(tmp)
    _outputs[os.path.abspath(tmp)] = path
    return tmp


def _drop_temp_folder(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    _live.discard(tmp)
    _outputs.pop(os.path.abspath(tmp), None)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, *, marker: str) -> Iterator[Path]:
    """A temp folder beside ``path``, put in its place only if the block succeeds (``staged`` for folders).

    An existing folder at ``path`` is replaced only if it holds ``marker`` (a file an earlier write
    of the same kind left, e.g. config.json): a folder of anything else is refused, never deleted.
    """
    path = Path(path)
    kind = not_regular(path)
    if path.is_file() or (kind and kind != "a folder"):
        raise WriteError(f"cannot write {path}: it is {kind or 'a file'}, not a folder; give a folder name with -o")
    if kind == "a folder" and any(path.iterdir()) and not (path / marker).is_file():
        raise WriteError(f"cannot write {path}: it is a folder of other files (no {marker}); give a new folder "
                         "name with -o")
    if not path.parent.is_dir():
        raise WriteError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = _temp_folder(path)
    old = None
    try:
        with writing(tmp):
            yield Path(tmp)
            if path.exists():  # moved aside into a temp folder first, so the new folder appears in one rename
                old = _temp_folder(path)
                os.replace(path, Path(old) / "old")
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover:
                _drop_temp_folder(leftover)


def companion_of(path: str | os.PathLike, suffix: str) -> Path:
    """The file that goes with ``path`` (``model.onnx`` -> ``model.onnx.data``)."""
    return Path(f"{os.fspath(path)}{suffix}")


@contextlib.contextmanager
def staged_pair(path: str | os.PathLike, companion: str) -> Iterator[Path]:
    """``staged`` for a file that may come with a second file beside it, named ``<path><companion>`` (an ONNX
    graph and its external data, which the graph names): the block writes both under their final names in a
    temp folder beside ``path`` (it gets the path for ``path``), and they are put in place only if it succeeds.

    The old pair goes as one: the old file is moved out of the way first (no reader sees an old file beside a
    new companion), then the companion is put in place (or an old one removed where the new file has none),
    then the file. A failure leaves neither new file, and a block that fails changes nothing.
    """
    path = Path(path)
    other = companion_of(path, companion)
    for dest in (path, other):
        _check_destination(dest)
    tmp = _temp_folder(path)
    new, new_other = Path(tmp) / path.name, Path(tmp) / other.name
    try:
        with writing(tmp):
            yield new
            for dest in (path, other):
                _check_destination(dest)  # a FIFO or a folder may have appeared there meanwhile
            if not new.is_file():
                raise WriteError(f"cannot write {path}: nothing was written")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, Path(tmp) / ".old")  # removed with the temp folder
            if new_other.exists():
                os.replace(new_other, other)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(other)
            os.replace(new, path)
    finally:
        _drop_temp_folder(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via a temp file in the destination folder and rename (see ``staged``)."""
    with staged(path) as tmp, open(tmp, "wb") as f:
        write(f)


# --- leftovers ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or one we cannot ask about: leave its files
        return True
    return True


def sweep(folder: str | os.PathLike) -> list[Path]:
    """Remove sdsurgeon's temp files in ``folder`` whose owner process (on this host, this user's) is gone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        found = _TEMP.match(name)
        if not found or found["host"] != _HOST or _alive(int(found["pid"])):
            continue
        leftover = Path(folder) / name
        with contextlib.suppress(OSError):
            st = os.lstat(leftover)
            if st.st_uid != os.getuid():
                continue
            if stat.S_ISREG(st.st_mode):
                os.unlink(leftover)
                removed.append(leftover)
            elif stat.S_ISDIR(st.st_mode):  # a staged folder (staged_folder)
                shutil.rmtree(leftover)
                removed.append(leftover)
    return removed


def _on_signal(signum, _frame) -> None:
    for hook in list(_on_signal_hooks):
        with contextlib.suppress(Exception):
            hook()
    for tmp in list(_live):
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the same signal, so the caller sees what happened


def clean_up_on_signals() -> None:
    """On SIGTERM or SIGHUP (a CI cancel, a closed terminal) remove this process's temp files, then die of it.

    For the command line and batch workers only; a handler someone else installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_signal)


@contextlib.contextmanager
def on_signal(hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook`` (e.g. stop worker processes) if a signal ``clean_up_on_signals`` handles arrives meanwhile."""
    _on_signal_hooks.append(hook)
    try:
        yield
    finally:
        _on_signal_hooks.remove(hook)
