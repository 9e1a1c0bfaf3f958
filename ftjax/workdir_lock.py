"""One writer per workdir: a lock file held for the whole run.

`W/ftjax.lock` holds the owner's JSON record (host, pid, start time) and an exclusive
`fcntl.flock` on the open file. The kernel drops a flock when its process dies, even
by SIGKILL, so a lock is never left held by a run that is gone; its record stays
behind as a stale lock, which the next run takes over with a logged line. A second
run while the owner lives is refused with one line naming the owner. The file is
removed when the run ends, also on errors.

Only local paths are locked (and NFS, where Linux maps flock onto NFS locks): object
stores (gs://, s3://) have no locks, so a run there is not protected from a second one.
Several processes of one run: process 0 takes the lock (see `train.train_and_evaluate`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from ftjax.errors import UserError
from ftjax.logs import info

LOCK_NAME = "ftjax.lock"


class WorkdirBusy(UserError):
    """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(record: dict) -> str:
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"started {record.get('started', '?')}")


class WorkdirLock:
    """An exclusive lock on a local workdir (see the module docstring).

    Args:
      workdir: the run folder; must exist. A path with "://" (an object store) is not
        locked: `acquire` then does nothing and returns False.
    """

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.local = "://" not in self.workdir
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode("utf-8", "replace").strip()
            record = json.loads(text) if text else {}
            return record if isinstance(record, dict) else {"damaged": text[:80]}
        except (OSError, ValueError):
            return {}

    def _open_locked(self) -> tuple[int, bool]:
        """(fd, whether flock is available) of the lock file, locked where possible."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = self._read(fd)
                os.close(fd)
                raise WorkdirBusy(
                    f"workdir {self.workdir} is in use by another ftjax run ({_describe(record)}): wait for it "
                    "to end, stop it, or use another --workdir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                return fd, False  # a filesystem without flock: the record alone decides
            # The previous owner may have removed the file between our open and flock:
            # then we hold a lock on a deleted file. Try again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)

    def acquire(self) -> bool:
        """Takes the lock; returns whether one was taken (False for object stores).

        Raises:
          WorkdirBusy: another live run holds it.
        """
        if not self.local:
            return False
        fd, flocked = self._open_locked()
        try:
            old = self._read(fd)
            here = socket.gethostname()
            if old and not flocked:
                pid, host = old.get("pid"), old.get("host")
                if host != here or (isinstance(pid, int) and _alive(pid)):
                    raise WorkdirBusy(
                        f"workdir {self.workdir} is in use by another ftjax run ({_describe(old)}); this "
                        f"filesystem has no file locks: if that run is gone, remove {self.path}")
            if old:
                info(f"taking over the stale lock {self.path} of a run that ended without releasing it "
                     f"({_describe(old)})")
            record = {"host": here, "pid": os.getpid(),
                      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Removes the lock file and drops the lock (a no-op when none is held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still locked: no other run can have taken it meanwhile
        except OSError:
            pass
        os.close(fd)  # drops the flock

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
