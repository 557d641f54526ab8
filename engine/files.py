"""Crash-safe writing: every file the engine saves is written under a temporary name and renamed into place.

A save that is killed while it writes (out of memory, Ctrl-C twice, a pre-empted machine) must not leave a
half-written adapter or model where a good one was. :class:`StagedFolder` writes each file of one save as
``.<name>.partial-<id>`` in the destination folder, flushes it to disk (``fsync``) and only when every file of the
save is complete renames them into place with :func:`os.replace` (atomic on POSIX and Windows within one file
system). So:

* a kill while data is being written leaves the previous save untouched (only ``*.partial-*`` files, which the
  next save into the folder removes);
* the renames at the end take milliseconds and write no data; files are renamed small-first, in the order they
  were staged, so a reader sees either the old or the new content of each file.

:func:`write_text` is the same for a single text file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["PARTIAL_MARK", "StagedFolder", "write_text"]

#: Part of the name of every file being written; a folder holding such files has an interrupted save in it.
PARTIAL_MARK = ".partial-"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFolder:
    """The files of one save into ``folder``, written aside and renamed into place together.

    Use as a context manager::

        with StagedFolder(out) as stage:
            save_file(tensors, stage.path("adapter_model.safetensors"))
            stage.write_text("adapter_config.json", text)
            stage.add_folder(tokenizer.save_pretrained)   # a function writing several files into a folder
        # here every file is in place; on an exception none was replaced and the partial files are gone

    Args:
        folder: the destination folder (created if missing). Leftover ``*.partial-*`` files of an earlier,
            interrupted save are removed first.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._id = uuid.uuid4().hex[:8]
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        for leftover in self.folder.glob(f".*{PARTIAL_MARK}*"):
            if leftover.is_file():
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)

    def path(self, name: str) -> str:
        """A temporary path to write the file ``name`` to (renamed to ``folder/name`` on commit)."""
        final = self.folder / name
        temp = final.with_name(f".{final.name}{PARTIAL_MARK}{self._id}")
        self._staged.append((temp, final))
        return str(temp)

    def write_text(self, name: str, text: str) -> None:
        Path(self.path(name)).write_text(text, encoding="utf-8")

    def add_folder(self, write) -> list[str]:
        """Stage every file ``write(tmp_folder)`` creates (e.g. ``tokenizer.save_pretrained``); returns their names."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp{PARTIAL_MARK}", dir=self.folder))
        try:
            write(str(tmp))
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            for name in names:
                os.replace(tmp / name, self.path(name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return names

    def commit(self) -> None:
        """Flush every staged file to disk, then rename each into place."""
        for temp, _ in self._staged:
            if not temp.exists():
                raise FileNotFoundError(f"{temp} was staged but never written")
            _fsync(temp)
        for temp, final in self._staged:
            os.replace(temp, final)
        _fsync_dir(self.folder)
        self._staged.clear()

    def abort(self) -> None:
        """Remove the staged files (the destination keeps what it had)."""
        for temp, _ in self._staged:
            temp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename; returns the path."""
    path = Path(path)
    with StagedFolder(path.parent) as stage:
        stage.write_text(path.name, text)
    return path
