"""Files written whole or not at all.

Every file xctune writes goes to a temporary file in the same folder and is renamed into place
(`os.replace`, atomic on one file system): a reader, a crash or a full disk never leaves half a
file. A study's outputs go through `OutputSet`: every file is staged first, then all are renamed
together, and files of an earlier run that this run did not produce are removed, so a folder
never mixes a new leaderboard with an old `best_map.json`. A failed write is `BadInput` (exit 2):
one line naming the file and the cause.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput


def _cause(e: OSError) -> str:
    return e.strerror or str(e)


def _temp_beside(path: Path) -> Path:
    """A new temporary file in the folder of `path`, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600
    finally:
        os.close(fd)
    return Path(tmp)


def check_writable(folder) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any long work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".xctune-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInput(f"cannot write to {folder}: {_cause(e)}") from None
    return folder


@contextmanager
def staged(path):
    """Yields a temporary path beside `path`; on a clean exit it replaces `path`, else it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
    except OSError as e:
        raise BadInput(f"cannot write {path}: {_cause(e)}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"cannot write {path}: {_cause(e)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    with staged(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class OutputSet:
    """A folder's set of outputs, replaced together.

        with OutputSet(folder, names=KNOWN_OUTPUTS) as out:
            out.write_text("best_map.json", text)
            with out.staged("history.png") as tmp: fig.savefig(tmp)
        # all renamed into place here; any of `names` not written this time is removed

    If anything fails before the end of the block, no file of the folder has changed.
    """

    def __init__(self, folder, names=()):
        self.folder = Path(folder)
        self.names = set(names)
        self._staged: dict[str, Path] = {}

    def __enter__(self):
        check_writable(self.folder)
        return self

    def path(self, name: str) -> Path:
        return self.folder / name

    @contextmanager
    def staged(self, name: str):
        """A temporary file for `name`, renamed into place with the rest of the set."""
        try:
            tmp = _temp_beside(self.folder / name)
        except OSError as e:
            raise BadInput(f"cannot write {self.folder / name}: {_cause(e)}") from None
        self._staged[name] = tmp
        try:
            yield tmp
        except OSError as e:
            raise BadInput(f"cannot write {self.folder / name}: {_cause(e)}") from None

    def write_text(self, name: str, text: str) -> Path:
        with self.staged(name) as tmp:
            tmp.write_text(text)
        return self.folder / name

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for tmp in self._staged.values():
                tmp.unlink(missing_ok=True)
            return False
        done = []
        try:
            for name, tmp in self._staged.items():
                os.replace(tmp, self.folder / name)
                done.append(name)
            for name in sorted(self.names - set(self._staged)):  # an earlier run's, not reproduced now
                (self.folder / name).unlink(missing_ok=True)
        except OSError as e:
            for name, tmp in self._staged.items():
                if name not in done:
                    tmp.unlink(missing_ok=True)
            failed = next((n for n in self._staged if n not in done), "")
            raise BadInput(f"cannot write {self.folder / failed}: {_cause(e)}") from None
        return False
