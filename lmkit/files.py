"""Where outputs go (a run's folders), atomic file writes, and early checks that folders are writable."""
import errno
import glob
import os
import stat
import sys
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
        """The run's folders; refused up front (exit 2) when the file system cannot hold their
        names, or the names of the files written in them."""
        paths = cls(out_dir / "checkpoints" / run, out_dir / "plots" / run,
                    out_dir / "samples" / run)
        check_path_fits(out_dir, "choose a shorter --out-dir")
        for folder in (paths.checkpoints, paths.plots, paths.samples):
            check_path_fits(folder, "choose a shorter --run or --out-dir", room=RUN_FILE_ROOM)
        return paths

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


# What atomic_write's temp file adds to a file's name: "." and "." around it, then tempfile's 8
# random characters and ".tmp".
TEMP_NAME_EXTRA = len("..") + 8 + len(".tmp")
# Room for the longest file name a run's folders get (sample.py's
# interactive-YYYYmmdd-HHMMSS-NN.txt) with its temp twin's extra.
RUN_FILE_ROOM = len("interactive-20250101-120000-99.txt") + TEMP_NAME_EXTRA


def check_path_fits(path, fix: str, extra: int = 0, room: int = 0) -> None:
    """Refuse up front (exit 2), before any work, a path the file system cannot hold: a name in
    it longer than NAME_MAX bytes, its last name included with `extra` bytes more (the temp
    name it is first written under), or the whole path, with `room` bytes more for a name in
    it, longer than PATH_MAX. fix says which flag to shorten."""
    pathconf = getattr(os, "pathconf", None)
    if pathconf is None:  # Windows: no such limits to ask for
        return
    path = Path(path)
    anchor = Path.cwd() / path
    while not os.path.isdir(anchor):  # the file system the new names will live on
        anchor = anchor.parent
    try:
        name_max, path_max = pathconf(anchor, "PC_NAME_MAX"), pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        return
    names = path.parts[1:] if path.is_absolute() else path.parts
    for i, name in enumerate(names):
        size = len(os.fsencode(name))
        added = extra if i == len(names) - 1 else 0
        if size + added > name_max:
            shown = name if len(name) <= 40 else name[:40] + "..."
            what = (f"{size} bytes long, {size + added} with the {added} its temporary name "
                    f"adds" if added and size <= name_max else f"{size} bytes long")
            raise UserError(f"the name {shown!r} is {what}, more than the {name_max} this file "
                            f"system allows in one name; {fix}", exit_code=2)
    size = len(os.fsencode(str(path))) + extra + (1 + room if room else 0)
    if size >= path_max:
        raise UserError(f"the path {str(path)[:40]}... is {size:,} bytes long with the names "
                        f"written in it, more than the {path_max - 1:,} this file system allows; "
                        f"{fix}", exit_code=2)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside folder durable (best effort: some filesystems refuse)."""
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


def current_umask() -> int:
    """The process umask, for giving temp files and folders the mode a plain create would."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Write errors that more room fixes: (what happened, what to do) for the sentence that says so.
FULL_DISK = {
    errno.ENOSPC: ("no space left on the device", "free space on the disk that holds {folder}"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is used up", "free space in your quota on "
                                   "the disk that holds {folder}, or raise the quota"),
    errno.EFBIG: ("the file grew past the largest size allowed", "raise the file size limit "
                  "(ulimit -f) or write to another file system"),
}


class WriteError(UserError):
    """A file that could not be written, its previous version (if any) intact: reason says why
    in a few words and fix what to do, for callers that say so in a sentence of their own."""

    def __init__(self, path, reason: str, fix: str, existed: bool):
        kept = "the previous file is intact" if existed else "nothing was written"
        super().__init__(f"cannot write {path}: {reason}; {kept}: {fix}, then run again")
        self.path, self.reason, self.fix = path, reason, fix


def write_error(path, error: OSError, existed: bool) -> WriteError:
    """The WriteError for an OSError raised while writing path (existed: it was there before)."""
    path = Path(path)
    if error.errno in FULL_DISK:
        reason, fix = FULL_DISK[error.errno]
        return WriteError(path, reason, fix.format(folder=path.parent), existed)
    if error.errno in (errno.EISDIR, errno.ENOTDIR):
        return WriteError(path, "it is a folder, or under a file", "move what is in the way",
                          existed)
    if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return WriteError(path, error.strerror or "permission denied",
                          "choose a writable folder or fix its permissions", existed)
    return WriteError(path, error.strerror or str(error), "check the disk", existed)


def os_error_behind(error: BaseException):
    """The OSError that error is, or that caused it: torch.save, for one, reports a failed
    write as a RuntimeError ("unexpected pos") raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_write(path, write) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file,
    and a failed write removes its temp file and raises a WriteError.
    """
    path = Path(path)
    existed = os.path.lexists(path)  # False, not an error, where the folder cannot be searched
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e, existed) from e
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual file mode
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
        cause = os_error_behind(e)
        if cause is not None:
            raise write_error(path, cause, existed) from e
        raise
    fsync_dir(path.parent)


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
            fix = ("fix its permissions or point the script at a writable folder"
                   if e.errno not in FULL_DISK else FULL_DISK[e.errno][1].format(folder=folder))
            raise UserError(f"cannot write to {folder} ({e.strerror or e}); {fix}") from e


def remove_stale_temp_files(folder) -> None:
    """Delete temp files a killed process left behind in folder (see atomic_write)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass


def name_leftovers(path) -> None:
    """Warn about temp files or folders that an interrupted write of path left beside it (they
    are named, not deleted: another process may be writing path right now)."""
    path = Path(path)  # an export leaves ".tmp" folders, or ".tmp.old" when it was replacing one
    leftovers = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"))
    if leftovers:
        names = ", ".join(str(p) for p in leftovers[:3]) + (" …" if len(leftovers) > 3 else "")
        print(f"note: {names} {'was' if len(leftovers) == 1 else 'were'} left by an interrupted "
              f"write of {path}; remove {'it' if len(leftovers) == 1 else 'them'} once no other "
              "command writes there", file=sys.stderr)


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
