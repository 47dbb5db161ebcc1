"""Files the user gives and files the project writes: the one place for their failure modes.

Reading (point files, prompt files): UTF-8, with an optional byte-order mark (Windows Notepad writes
one) stripped; bytes that are not UTF-8 are an error naming the file and line.

Writing (videos, sample records, checkpoints, ``latest``): every file is staged under a hidden temporary
name in its final folder, flushed to disk (fsync), given the mode a plain ``open()`` would give it (0666
minus the umask; ``tempfile`` alone would leave 0600, unreadable for teammates) and renamed into place;
the folder is fsynced after the renames.  :class:`StagedFiles` does this for several files at once, so
one sample's outputs appear together or not at all.  A write that fails because the disk is full says
"no space left on <folder>".
"""
from __future__ import annotations

import codecs
import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ToraError


class InputFileError(ToraError, ValueError):
    """A user text file that cannot be decoded; the message names the file and line."""


class OutputError(ToraError, OSError):
    """An output that cannot be written (full disk, read-only folder, a file where a folder should be)."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def read_user_text(path: str | Path, what: str) -> str:
    """The text of a user file (UTF-8, optional BOM stripped); ``what`` names it in errors."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputFileError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                             f"save the file as UTF-8") from None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(folder: Path, err: BaseException | None = None) -> bool:
    """True when ``err`` (or any error it chains to) is ENOSPC, or ``folder``'s file system has no room."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def no_space_error(folder: Path) -> OutputError:
    return OutputError(f"no space left on {folder} (free some space or choose another folder)")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_new(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` unless ``final`` exists (a hard link is atomic and exclusive; file
    systems without links get an exists-check first)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        if final.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(final)) from None
        os.replace(tmp, final)
    else:
        tmp.unlink()


class StagedFiles:
    """Temporary files that become their final names together (``commit``) or vanish (``discard``).

        with StagedFiles() as staged:
            write_a(staged.path(final_a)); write_b(staged.path(final_b))
        # both renamed into place here; on an exception neither exists and the temporaries are gone
    """

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, final: str | Path) -> Path:
        """A fresh temporary path in ``final``'s folder (same file system, so the rename is atomic)."""
        final = Path(final)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=final.suffix)
        os.close(fd)
        self.pending.append((Path(name), final))
        return Path(name)

    def finals(self) -> list[Path]:
        return [final for _, final in self.pending]

    def retarget(self, finals: list[Path]) -> None:
        """New final paths, one per staged file in staging order."""
        assert len(finals) == len(self.pending)
        self.pending = [(tmp, Path(final)) for (tmp, _), final in zip(self.pending, finals)]

    def commit(self, exclusive: bool = False) -> None:
        """fsync, set the mode, rename into place, fsync the folders.  ``exclusive``: never replace an
        existing file; if one of the final names exists, FileExistsError, with nothing placed."""
        mode = 0o666 & ~current_umask()
        for tmp, final in self.pending:
            try:
                fsync_path(tmp)
            except OSError as err:
                raise (no_space_error(final.parent) if disk_full(final.parent, err) else err) from None
            os.chmod(tmp, mode)
        placed = []
        try:
            for tmp, final in self.pending:
                _place_new(tmp, final) if exclusive else os.replace(tmp, final)
                placed.append(final)
        except FileExistsError:
            for final in placed:  # exclusive placements are ours: undo them
                final.unlink()
            raise
        for folder in {final.parent for _, final in self.pending}:
            fsync_path(folder)
        self.pending = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, kind, err, trace) -> None:
        if err is None:
            try:
                self.commit()
            finally:
                self.discard()
            return
        folders = [final.parent for _, final in self.pending]
        full = any(disk_full(folder, err) for folder in folders)  # checked before the temporaries go
        self.discard()
        if full and not isinstance(err, OutputError):
            raise no_space_error(folders[0]) from err


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """One staged file: write to the yielded path; it becomes ``final`` when the block ends cleanly."""
    with StagedFiles() as staged:
        yield staged.path(final)


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_folder(folder: str | Path, subfolders: tuple[str, ...] = (), what: str = "output folder") -> None:
    """Fail early, naming the path, when ``folder`` (and its ``subfolders``) cannot receive files.

    Creates the folders (as the run would) and writes and removes a probe file in each, so read-only
    mounts, permission problems and a file standing where a folder should be all surface here.
    """
    folder = Path(folder)
    created = []  # removed again on failure: a failed check leaves nothing behind
    try:
        for target in [folder, *(folder / sub for sub in subfolders)]:
            _check_writable(target, what, created)
    except OutputError:
        for target in reversed(created):
            with contextlib.suppress(OSError):
                target.rmdir()
        raise


def _check_writable(target: Path, what: str, created: list[Path]) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {target} is a file, not a folder")
    try:
        missing = [p for p in [target, *target.parents] if not p.exists()]
        target.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing))
        fd, probe = tempfile.mkstemp(dir=target, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if disk_full(target, err):
            raise no_space_error(target) from None
        raise OutputError(f"cannot write to {what} {target}: {err.strerror}") from None
