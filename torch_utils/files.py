"""Writing files so that no failure or kill ever leaves half a file.

- atomic_write: every file the scripts write goes through it (temporary name, fsync, rename); a write that
  fails for lack of space, quota or permission removes its temporary file, leaves the old file as it was, and
  becomes a UserError. output_folder and output_file check an output flag's path before any work.
- Metrics files (JSON Lines): appends that start on a fresh line, and reading that skips damaged lines.
"""
import errno
import hashlib
import io
import json
import os

import torch

from torch_utils.cli import UserError


def _file_in_the_way(path):
    """The part of path (path itself or a folder above it) that is there and is not a folder (a file, or a
    symlink to nothing), or None."""
    part = os.path.normpath(path)
    while part and not os.path.lexists(part):
        above = os.path.dirname(part)
        if above == part:
            return None
        part = above
    return part if part and not os.path.isdir(part) else None


def _what_is(part):
    """What _file_in_the_way found, for a message."""
    return "a file" if os.path.exists(part) else f"a dangling symlink (to {os.readlink(part)})"


def output_folder(path, flag, named=None, create=True):
    """Create the folder an output flag names (and those above it), or with create=False only check that it
    can be; a one-line UserError when it cannot be: a file or a dangling symlink of that name or where a folder
    above it should be, no permission. named: the flag's value when it names a file in that folder."""
    named = named or path
    blocker = _file_in_the_way(path)
    if blocker == os.path.normpath(named):
        raise UserError(f"{flag} {named} is {_what_is(blocker)}, not a folder; choose another {flag}")
    if blocker is not None:
        raise UserError(f"{flag} {named}: {blocker} is {_what_is(blocker)}, not a folder; choose another {flag}")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {named}: cannot create {path} ({e.strerror}); choose another {flag}") from None


def output_file(path, flag, folder_must_exist=False):
    """Check, before any work, that the file an output flag names can be written: not a folder, and no file
    where its folder should be (the write makes the folder, unless folder_must_exist)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; name a file")
    folder = os.path.dirname(path) or "."
    output_folder(folder, flag, named=path, create=False)
    if folder_must_exist and not os.path.isdir(folder):
        raise UserError(f"the folder of {flag} {path} does not exist")


def output_parts(folder, files=(), folders=(), flag="--out-dir"):
    """Check, before any work, what a run writes in the folder an output flag names: no folder where it writes
    one of files, and nothing but folders where it makes one of folders (output_folder); names relative to
    folder. Otherwise the first write, after the work, would fail."""
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            raise UserError(f"{flag} {folder}: {path} is a folder, not a file; choose another {flag}")
    for name in folders:
        output_folder(os.path.join(folder, name), flag, named=folder, create=False)


# errno values that mean "this place cannot take the file": the fix is space, quota or another folder.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_error(path, error, hint="choose another --out-dir"):
    """The UserError for an OSError met while writing path; hint (None: none) says what to do."""
    message = f"cannot write {path}: {error.strerror or error}"
    if hint is not None:
        message += f"; free space or {hint}" if error.errno in NO_ROOM else f"; {hint}"
    return UserError(message)


def atomic_write(path, content, hint="choose another --out-dir"):
    """Write content (bytes) to path: to a temporary file of this process first, flushed to disk, then
    renamed over path. A kill leaves the old file or the new one, never half of one; a failed write (full
    disk, quota, permission) removes the temporary file, keeps the old one and raises a UserError."""
    write_together([(path, content)], hint)


def write_together(contents, hint="choose another --out-dir", ready=None):
    """atomic_write for several files (path, bytes) that belong together, such as an epoch's checkpoint, models
    and grid: all are written to temporary files first and renamed only when every one of them is written, so
    a write that fails changes none of them. ready(), when given, runs between the two and may raise to
    change nothing (a last check that the folder is still this run's)."""
    written = []
    try:
        for path, content in contents:
            tmp = f"{path}.{os.getpid()}.tmp"
            written.append(tmp)
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise write_error(path, e, hint)
        if ready is not None:
            ready()
        for (path, _), tmp in zip(contents, written):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e, hint)
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)


def file_digest(path, algorithm):
    """The hex digest of the file at path by hashlib's algorithm ("sha256", ...), read in 1 MB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torch_bytes(obj):
    """obj as torch.save writes it. Serialized in memory, so that a short write on disk is an OSError with its
    reason (torch.save reports one as a RuntimeError without it)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(obj, path, hint="choose another --out-dir"):
    atomic_write(path, torch_bytes(obj), hint)


def image_bytes(image, format, **options):
    """A PIL image encoded as format ("PNG", ...), with Pillow's options for it (quality=95, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def append_metrics(path, record):
    """Append one JSON line. When the file's last line was cut short (a kill or a full disk mid-append), the
    record starts on a fresh line instead of being glued to the fragment."""
    line = json.dumps(record) + "\n"
    try:
        with open(path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
    except OSError as e:
        raise write_error(path, e)


def read_metrics(path):
    """(records, number of damaged lines skipped) of a metrics file."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def rewrite_metrics(path, records):
    """Replace the metrics file with these records, atomically."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
