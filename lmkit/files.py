"""Where outputs go (a run's folders), atomic file writes, and early checks that folders are writable."""
import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmkit.errors import UserError

# The default home of data/, checkpoints/, plots/ and samples/.
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunPaths:
    """A run's three folders: checkpoints/<run>, plots/<run> and samples/<run> under out_dir."""
    checkpoints: Path
    plots: Path
    samples: Path

    @classmethod
    def for_run(cls, out_dir: Path, run: str) -> "RunPaths":
        return cls(out_dir / "checkpoints" / run, out_dir / "plots" / run, out_dir / "samples" / run)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.checkpoints / "metrics.csv"

    @property
    def plot(self) -> Path:
        return self.plots / "loss_plot.png"


def check_run_name(name: str) -> str:
    """A run name names a folder inside checkpoints/, plots/ and samples/: never a path."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name
            or name != name.strip()):
        raise UserError(f"--run {name!r} is not a run name: a run name is one folder name, with no "
                        "path separator, not '.' or '..', and no space at either end", exit_code=2)
    return name


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file,
    and a failed write removes its temp file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); choose a writable folder") from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while writing {path}; "
                            "the previous file is intact: free some space and run again") from e
        if isinstance(e, OSError) and e.errno in (errno.EISDIR, errno.ENOTDIR):
            raise UserError(f"cannot write {path}: it is a folder, or under a file") from e
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {path} ({e.strerror}); "
                            "choose a writable folder or fix its permissions") from e
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_user_file(path, what: str) -> bytes:
    """The bytes of a file the user named; one clear sentence if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; pass a text file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); check its permissions") from None


def ensure_writable_dirs(*folders) -> None:
    """Create each folder and prove it takes a file, before any expensive work starts."""
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror or e}); "
                            "fix its permissions or point the script at a writable folder") from e


def remove_stale_temp_files(folder) -> None:
    """Delete temp files a killed process left behind in folder (see atomic_write)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass


class RunLock:
    """Ownership of a folder while a process writes it (a run's checkpoints, a data folder): an
    exclusive lock on a lock file that the operating system drops when the process ends, however
    it ends."""

    def __init__(self, folder: Path, name: str = ".lock"):
        self.path = Path(folder) / name
        self.file = None

    def acquire(self, what: str, elsewhere: str = "choose another --run") -> None:
        """Take the lock, or refuse at once with one sentence naming the process that holds it."""
        ensure_writable_dirs(self.path.parent)
        while True:
            self.file = _open_lock_file(self.path)
            if not _try_lock(self.file):
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                self.file = None
                raise UserError(f"{what} is in use by {holder}; wait for it to finish, stop it, "
                                f"or {elsewhere}")
            if _same_file(self.file, self.path):
                break
            self.file.close()  # locked a file its holder removed on release: take the new one
        self.file.seek(0)
        self.file.truncate()  # ours now: a plain file, locked by this process
        try:  # unbuffered, so that a full disk leaves nothing pending: the lock holds anyway
            os.write(self.file.fileno(), f"process {os.getpid()}".encode())
        except OSError:
            pass

    def release(self, remove: bool = False) -> None:
        """Let go of the lock; remove: delete the lock file too (while still holding it, so that
        no other process can hold the old file and a new one at once)."""
        if self.file is not None:
            if remove:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:  # Windows keeps an open file; the next process takes it over
                    pass
            self.file.close()  # closing drops the lock
            self.file = None


def _same_file(f, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _open_lock_file(path: Path):
    """The lock file, opened for reading and writing without following a symlink (a .lock
    planted to point at another file must not get that file truncated) and without changing it."""
    refusal = (f"{path} is not a plain file (a symbolic link, a folder or a device); remove it "
               "and run again: it only marks which process is using the folder")
    no_follow = getattr(os, "O_NOFOLLOW", 0)
    if not no_follow and path.is_symlink():  # a system without O_NOFOLLOW: check by name first
        raise UserError(refusal)
    flags = os.O_RDWR | os.O_CREAT | no_follow | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR) or path.is_symlink() or path.is_dir():
            raise UserError(refusal) from None
        raise UserError(f"cannot open {path} ({e.strerror}); fix its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(refusal)
    return os.fdopen(fd, "r+", encoding="utf-8")


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
