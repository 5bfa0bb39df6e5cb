"""Files and folders a command reads or writes: written whole or not at all, one writer at a time,
and what went wrong said in one line (the standard for bad input in README.md).

Plain Python, no torch: ablate.py and config.py, which only launch and check, use it too.
"""
import errno
import fcntl
import json
import os
import stat


class RunError(Exception):
    """A run, or a folder a command writes, cannot be used: said in one line."""


def first_line(e):
    """The first line of an exception's message (its type's name if it has none), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def reason_of(error):
    """Why a write failed, in a few words: 'disk full' for ENOSPC, the OS's words, or the message's first line."""
    if isinstance(error, OSError):
        return "disk full" if error.errno == errno.ENOSPC else error.strerror or str(error)
    return first_line(error)


def regular_file(path, what):
    """Raise ValueError unless `path` is a regular file (a named pipe or a device would block or
    stream forever when read; a folder is a mistake)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what}: file not found: {path}")
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path} ({e.strerror})")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what}: {path} is not a regular file")


def write_whole(path, write):
    """Write a file atomically: `write(f)` fills a temp file beside it, which is then renamed, so a
    reader sees the old file or the new one; the folders above it are made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path + ".tmp", "w") as f:
            write(f)
        os.replace(path + ".tmp", path)
    except BaseException:  # a failed write or a full disk: the old file stays, no half-written one beside it
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def write_json(obj, path, indent=2):
    """Write JSON atomically (write_whole)."""
    write_whole(path, lambda f: json.dump(obj, f, indent=indent))


def cannot_write(path):
    """Why the file `path` cannot be written (its missing folders made first), in a few words, or
    None: it is a folder, a file stands where one of its folders should be, or the place is not
    writable (a read-only disk, no permission)."""
    if os.path.isdir(path):
        return "a folder, not a file"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    target = path if os.path.exists(path) else parent
    return None if os.access(target, os.W_OK) else f"{target} cannot be written (read-only or no permission)"


def make_folder(path, what="--out"):
    """Create a folder a command writes (`what`: how the user named it), or say in one line why it
    cannot be used: a file there, a parent that is not a folder, a read-only disk."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"{what} {path}: a file, not a folder; choose another --out")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunError(f"{what} {path}: cannot create it ({e.strerror})")
    if not os.access(path, os.W_OK):
        raise RunError(f"{what} {path}: cannot write there (read-only); choose another --out")


class Lock:
    """Exclusive lock on FOLDER/.lock for the life of the command that writes the folder (train.py
    its run folder, ablate.py its study, prepare.py its --out). flock is released by the kernel
    when the process ends, so a crashed command never leaves a stale lock behind."""

    def __init__(self, folder, command="train.py"):
        self.path = os.path.join(folder, ".lock")
        self.command = command
        self.file = None

    def __enter__(self):
        try:
            # O_NOFOLLOW: a .lock that is a symbolic link (a shared folder) must not let the trainer
            # write its pid into the file the link points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self.file = os.fdopen(fd, "r+")
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "?"
            self.file.close()
            raise RunError(f"{os.path.dirname(self.path)} is in use by another {self.command} (pid {owner}); "
                           f"wait for it to finish or use another --out")
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunError(f"{self.path} is a symbolic link; remove it (a folder's lock is a plain file)")
            raise RunError(f"cannot write to {os.path.dirname(self.path)} ({e.strerror})")
        self.file.seek(0)
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
