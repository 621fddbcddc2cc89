"""One run per output folder: OutDirLock, a lock file that works on NFS and Lustre, with a heartbeat thread."""
import errno
import json
import os
import socket
import threading
import time
import uuid

from torch_utils.cli import UserError
from torch_utils.files import atomic_write, write_error


class OutDirLock:
    """A lock file <out-dir>/<job>.lock held for a run's lifetime, so that two runs (say, a resubmitted job and
    the one still running) never write one checkpoint in turn.

    It works where cluster home and scratch file systems live (NFS, Lustre), where flock may be missing or
    local to one node: the holder's record is written whole to a file of its own, then hard-linked to the lock's
    name, which those file systems make atomic and exclusive (no one ever sees an empty lock; a full disk fails
    before the lock exists). It names its holder (host, pid, start time) and carries a heartbeat, rewritten
    every HEARTBEAT seconds. A lock is stale, and taken over, when its holder is on this host and its process is
    gone (kill -9), or when its content (a heartbeat, or an empty or damaged file) has not changed for
    STALE_AFTER seconds of watching (a crashed node; no clocks are compared). Deleting the file by hand clears
    it too. A holder frozen for longer (SIGSTOP, a hung file server) may find its lock taken when it wakes:
    check() says so, and the holder must then stop without writing anything more."""

    HEARTBEAT = 10
    STALE_AFTER = 60

    def __init__(self, path):
        self.path = path
        self.token = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "id": uuid.uuid4().hex, "beat": 0}
        self._stop = threading.Event()
        self._beater = None
        self.lost = False

    def acquire(self, wait, what, give_up=lambda: False):
        """Take the lock, waiting up to `wait` seconds for its holder; a UserError naming the holder after.
        Returns False, without the lock, as soon as give_up() is true (a stop signal during the wait)."""
        deadline = time.monotonic() + wait
        seen, seen_since = None, time.monotonic()
        while not give_up():
            if self._create():
                self._beater = threading.Thread(target=self._beat, daemon=True)
                self._beater.start()
                return True
            content = self._content()
            if content != seen:
                seen, seen_since = content, time.monotonic()
            if content is not None and self._stale(parse_holder(content), time.monotonic() - seen_since):
                self._remove_if(lambda now: now == content)
                continue
            if time.monotonic() >= deadline:
                raise UserError(f"another {what} run is using {os.path.dirname(self.path) or '.'} "
                                f"({describe_holder(content)}): wait for it to end, choose another --out-dir, or "
                                f"delete {self.path} if that run is gone")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return False

    def check(self):
        """Raise a UserError unless the lock file still holds this holder's record: while this process was
        frozen, another run may have found the lock stale and taken over (or the file was deleted)."""
        if self.held():
            return
        content = self._content()
        if content is None:
            raise UserError(f"{self.path} was deleted while this run held it (by hand, or by a run that took it over "
                            "and has ended): this run stops here without writing anything more; run the same "
                            "command with --resume to continue from the last checkpoint")
        raise UserError(f"another run took over {os.path.dirname(self.path) or '.'} ({describe_holder(content)}) "
                        f"while this one was stopped or frozen for over {self.STALE_AFTER:g} s: this run stops here "
                        "without writing anything more and leaves the folder to that run")

    def held(self):
        """Whether the lock file still holds this holder's record; once not, never again."""
        if not self.lost:
            try:
                with open(self.path, "rb") as f:
                    content = f.read()
            except FileNotFoundError:
                content = None
            except OSError:
                return True  # a hiccup of the file server: the next check tells
            self.lost = not self._is_mine(content)
        return not self.lost

    def release(self):
        self._stop.set()
        if self._beater is not None:
            self._beater.join()  # a beat written after the removal would leave the lock behind
        self._remove_if(self._is_mine)

    def _is_mine(self, content):
        holder = parse_holder(content)
        return holder is not None and all(holder.get(k) == self.token[k] for k in HOLDER_KEYS)

    def _create(self):
        """Whether this call created the lock file, with the whole record in it."""
        own = f"{self.path}.{self.token['id']}.tmp"
        try:
            with open(own, "w") as f:  # closing it is enough for other NFS clients to read it whole
                json.dump(self.token, f)
            os.link(own, self.path)
            return True
        except FileExistsError:
            # On NFS a link whose reply was lost is retried and fails, though it was made: the count tells.
            return os.stat(own).st_nlink == 2
        except OSError as e:
            if e.errno in NO_HARD_LINKS:
                return self._create_in_place()
            raise write_error(self.path, e) from None
        finally:
            try:
                os.remove(own)
            except OSError:
                pass

    def _create_in_place(self):
        """_create where the file system has no hard links: O_EXCL, then the record (removed if that fails)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.token, f)
        except OSError as e:
            os.remove(self.path)
            raise write_error(self.path, e) from None
        return True

    def _content(self):
        """The lock file's bytes, or None when it is gone (or cannot be read now)."""
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _stale(self, holder, unchanged_for):
        if holder is not None and holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
            return True
        return unchanged_for > self.STALE_AFTER

    def _remove_if(self, still):
        """Remove the lock file if still(its content) holds (a newer holder's file stays)."""
        content = self._content()
        if content is not None and still(content):
            try:
                os.remove(self.path)
            except OSError:
                pass

    def _beat(self):
        while not self._stop.wait(self.HEARTBEAT):
            if not self.held():
                return  # taken over while this process was frozen: the file is the new holder's now
            self.token["beat"] += 1
            try:
                atomic_write(self.path, json.dumps(self.token).encode())
            except UserError:
                pass  # a missed beat: the next one tries again


HOLDER_KEYS = ("host", "pid", "since", "id")  # what tells one holder from another (the beat changes)
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # os.link on FAT, some FUSE and SMB


def parse_holder(content):
    """The holder's record in a lock file's bytes, or None when it is empty or damaged."""
    try:
        holder = json.loads(content)
    except (TypeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(content):
    holder = parse_holder(content)
    if holder is None:
        return "unknown holder: the lock file is empty or damaged" if content is not None else "unknown holder"
    return f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
