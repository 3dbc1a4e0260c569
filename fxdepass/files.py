"""Writing output files: the one place every file fxdepass writes is opened (Note [Writing outputs]).

>>> write_text("out/graph.dot", text)                    # refuses when out/graph.dot exists    # doctest: +SKIP
>>> write_text("out/graph.dot", text, overwrite=True)    # replaces it (a symbolic link: never)  # doctest: +SKIP
>>> with open_output("results.jsonl", "a") as file:      # appends (resuming a run)              # doctest: +SKIP
...     file.write(line)
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import IO, Iterator

from .errors import OutputError

__all__ = ["check_output", "open_output", "output_directory", "write_text"]

# Note [Writing outputs]
# The command line, the report, the exports and the results of a prompts file write through open_output, so
# one set of rules holds for every file fxdepass writes:
# - An existing file is replaced only when the caller asked for it (overwrite=True, --force): output folders
#   are often reused, and a report or an export silently replacing another run's is a lost result.  Creating
#   with O_EXCL makes the check and the creation one step, so a file appearing in between is not replaced.
# - A symbolic link at the path is refused, overwrite or not: the link may lead anywhere (a file the user
#   never named as an output).  O_NOFOLLOW refuses a link made between the check and the open too.  The
#   folder the caller names may itself be a link (it was named on purpose); what lies inside it is not.
# - Only regular files: a directory, FIFO or device at the path is refused rather than written into.
# - Appending (mode "a": a results file resumed) extends an existing regular file; it never replaces one.
# Each refusal is an OutputError naming the path, so the command line reports it in one line.

_EXISTS = "fxdepass replaces a file only when asked to (--force on the command line, overwrite=True in Python)"


def _failed(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ELOOP:         # O_NOFOLLOW met a link
        return OutputError(f"{path} is a symbolic link: fxdepass does not write through links; remove it or write elsewhere")
    if isinstance(error, FileExistsError):
        return OutputError(f"{path} already exists: {_EXISTS}")
    return OutputError(f"cannot write {path}: {error.strerror or error}")


def check_output(path: str | os.PathLike, *, overwrite: bool = False, append: bool = False) -> Path:
    """``path`` if a file may be written there (Note [Writing outputs]), else :class:`OutputError`; nothing is
    written, so a caller can refuse before the work that produces the file.

    >>> check_output("out/graph.dot")                                                   # doctest: +SKIP
    PosixPath('out/graph.dot')
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as error:               # e.g. a file where a folder of the path should be
        raise _failed(path, error) from None
    if stat.S_ISLNK(mode):
        raise _failed(path, OSError(errno.ELOOP, "symbolic link"))
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path} exists and is not a regular file: give another output path")
    if not (overwrite or append):
        raise OutputError(f"{path} already exists: {_EXISTS}")
    return path


def output_directory(path: str | os.PathLike, *, create: bool = True) -> Path:
    """``path`` as a folder to write into, made (with its parents) when missing and ``create``; without
    ``create``, only checked: an existing folder, or one that can be made in the nearest existing folder above.
    :class:`OutputError` when it is a file or cannot be made or written to.

    >>> output_directory("out")                                                         # doctest: +SKIP
    PosixPath('out')
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():          # a dangling link: mkdir would fail, say why
            raise OutputError(f"{existing} is a symbolic link to nothing: give another output folder")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{existing} exists and is not a folder" + (f", so {path} cannot be made" if existing != path else
                                                                   ": give a folder for the outputs"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {existing}: permission denied")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot make the folder {path}: {error.strerror or error}") from None
    return path


@contextlib.contextmanager
def open_output(path: str | os.PathLike, mode: str = "w", *, overwrite: bool = False) -> Iterator[IO]:
    """Open ``path`` to write (mode ``"w"``/``"wb"``) or append (``"a"``/``"ab"``) under the rules of Note [Writing
    outputs]; text is UTF-8 and written as given (no newline translation).

    >>> with open_output("out/graph.graphml", "wb") as file:                            # doctest: +SKIP
    ...     nx.write_graphml(graph, file)
    """
    if mode not in ("w", "wb", "a", "ab"):
        raise ValueError(f"open_output mode {mode!r}: use 'w', 'wb', 'a' or 'ab'")
    append = mode.startswith("a")
    path = check_output(path, overwrite=overwrite, append=append)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if append else os.O_TRUNC if overwrite else os.O_EXCL
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        raise _failed(path, error) from None
    binary = mode.endswith("b")
    try:
        with os.fdopen(descriptor, mode, **({} if binary else {"encoding": "utf-8", "newline": ""})) as file:
            yield file
    except BaseException:
        if not (append or overwrite):      # a file this call made, half written: leave nothing behind
            path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to a new file ``path`` (or replace it with ``overwrite``); returns the path.

    >>> write_text("out/graph.dot", "digraph {}")                                       # doctest: +SKIP
    PosixPath('out/graph.dot')
    """
    with open_output(path, overwrite=overwrite) as file:
        file.write(text)
    return Path(path)
