"""LocalShiftStore: a folder of safetensors files, the embedded default (no server)."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import SplitResult

import platformdirs
from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from shift_store import base
from shift_store.base import ShiftKey, StoredShift, StoreUnavailableError
from shift_store.errors import check_namespace
from shift_store.vector import ShiftFormatError, ShiftVector, read_meta

log = logging.getLogger("shift_store")
_SUFFIX = ".safetensors"
_TMP = ".tmp-"
_ORPHAN_AGE_S = 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _open_entry(path: Path) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """A stored entry opened for reading, if it is a regular file within the size cap (a named
    pipe, a directory, a device or an oversized file that a store writer put at a key's path
    is a format error, found without reading or blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO does not block its opener
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShiftFormatError(f"{path.name} is not a regular file")
        if st.st_size > base.MAX_ENTRY_BYTES:
            raise ShiftFormatError(
                f"{path.name} has {st.st_size:,} bytes, over the {base.MAX_ENTRY_BYTES:,}-byte cap"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        yield f, st


def _version(st: os.stat_result) -> str:
    # os.replace gives the new file another inode, so a replaced vector always changes version
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


class LocalShiftStore:
    """Vectors as ``<folder>/<namespace>/<key>.safetensors``, written by temp file and rename."""

    def __init__(
        self,
        folder: str | Path | None = None,
        namespace: str = "default",
    ) -> None:
        self.signed = False
        root = Path(folder or platformdirs.user_cache_dir("cmrm-guardrail")) / "shifts"
        self.namespace = check_namespace(namespace)
        self.folder = root / namespace
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create store folder {self.folder}: {e}") from e

    def __repr__(self) -> str:
        return f"LocalShiftStore({str(self.folder.parent.parent)!r}, namespace={self.namespace!r})"

    def _path(self, key: ShiftKey) -> Path:
        return self.folder / f"{key.name}{_SUFFIX}"

    def version(self, key: ShiftKey) -> str | None:
        try:
            return _version(self._path(key).stat())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {self.folder}: {e}") from e

    def get(self, key: ShiftKey) -> tuple[ShiftVector, str] | None:
        path = self._path(key)
        try:
            with _open_entry(path) as (f, st):
                version = _version(st)
                payload = f.read(base.MAX_ENTRY_BYTES + 1)
            return ShiftVector.from_bytes(payload), version
        except FileNotFoundError:
            return None
        except ShiftFormatError as e:
            log.warning("rejected shift file %s: %s", path, e)
            raise
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {path.name}: {e}") from e

    def put(self, key: ShiftKey, vector: ShiftVector) -> str:
        """Write atomically; a failed write (disk full, read-only folder) raises
        :class:`StoreUnavailableError` and leaves the previous entry in place."""
        try:
            return self._put(key, vector)
        except OSError as e:
            raise StoreUnavailableError(f"cannot write to {self.folder}: {e}") from e

    def _put(self, key: ShiftKey, vector: ShiftVector) -> str:
        self._remove_orphans()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f"{_TMP}{os.getpid()}-", suffix=_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(vector.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(key))
            _fsync_dir(self.folder)  # the rename itself survives a power cut
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.version(key) or ""

    def _remove_orphans(self) -> None:
        """Delete temporary files of writers that died mid-write (their process is gone, or
        the file is older than an hour)."""
        for path in self.folder.glob(f"{_TMP}*{_SUFFIX}"):
            pid = path.name.removeprefix(_TMP).split("-", 1)[0]
            try:
                stale = time.time() - path.stat().st_mtime > _ORPHAN_AGE_S
                if stale or not (pid.isdigit() and _alive(int(pid))):
                    path.unlink()
            except FileNotFoundError:
                continue  # finished or removed meanwhile

    def delete(self, key: ShiftKey) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> list[StoredShift]:
        entries = []
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            if path.name.startswith(_TMP):
                continue
            try:
                with _open_entry(path) as (f, _):
                    meta = read_meta(f)
            except (OSError, ShiftFormatError) as e:
                log.warning("unreadable shift file %s: %s", path, e)
                continue
            entries.append(
                StoredShift(
                    key=path.name.removesuffix(_SUFFIX), meta=meta, version=_version(path.stat())
                )
            )
        return entries

    @contextmanager
    def lock(self, key: ShiftKey, timeout_s: float, expire_s: float = 0.0) -> Iterator[bool]:
        # An OS file lock: released by the kernel when its holder dies, so expire_s is not needed.
        lock = FileLock(str(self.folder / f".{key.name}.lock"))
        try:
            lock.acquire(timeout=timeout_s)
        except FileLockTimeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


def open_url(url: SplitResult, params: dict[str, str], namespace: str) -> LocalShiftStore:
    """``file:///path``: a store in ``/path`` (the ``file`` scheme's opener)."""
    return LocalShiftStore(url.path, namespace=namespace)
