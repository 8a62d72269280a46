"""Directories no other local user can change: where we write what an engine will load.

An engine loads whatever is at the path we give it. A user who can rename an entry on that
path, whether the directory or one of its ancestors, can put their own files there after we
have written ours and before the engine loads them. ``private_dir`` accepts a directory only
when nobody but us and root can change anything on the way to it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

_ROOT_UID = 0  # root can change anything anyway: trusting it costs nothing


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) as a directory only we can change, or ValueError naming what
    is wrong and what to do. If missing, it is created 0700, and so is each missing ancestor.
    If it exists, it must be a real directory (not a symlink), owned by us, and not writable
    by group or others. Every ancestor must be owned by us or root; one that others may write
    must be sticky (/tmp, /dev/shm). Write inside the returned path: it is ``path`` with
    ``..`` resolved the way it was checked."""
    target = Path(os.path.abspath(path))
    uid = os.geteuid()
    _check_ancestor(Path(target.anchor), os.lstat(target.anchor), uid)
    cur = Path(target.anchor)
    parts = target.parts[1:]
    for i, part in enumerate(parts):
        cur = cur / part
        st = _lstat_or_mkdir(cur)
        if i == len(parts) - 1:
            _check_private(cur, st, uid)
        else:
            cur = _check_ancestor(cur, st, uid)
    return target


def _lstat_or_mkdir(path: Path) -> os.stat_result:
    # Create, then look at what is there without following a link: whoever created it first,
    # us or a racing user, the checks below judge the entry actually in place. Our parent
    # was checked already, so once it passes nobody else can swap it any more.
    try:
        return os.lstat(path)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return os.lstat(path)


def _check_private(path: Path, st: os.stat_result, uid: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(
            f"{path} is a symlink (to {os.readlink(path)}), not a directory: whoever can "
            f"change the link decides where we write. Give the real directory, or remove it"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} exists and is not a directory: remove it or use another path")
    if st.st_uid != uid:
        raise ValueError(
            f"{path} is owned by uid {st.st_uid}, not by us (uid {uid}): its owner can replace "
            f"what we write there. Have it removed, or use another path"
        )
    if st.st_mode & 0o022:
        raise ValueError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can write it and "
            f"replace what we write there. Run `chmod go-w {path}` (check what it holds "
            f"first), or use another path"
        )


def _check_ancestor(path: Path, st: os.stat_result, uid: int) -> Path:
    """Nobody else can rename an entry of ``path``; returns where it leads (a link's target)."""
    if st.st_uid not in (uid, _ROOT_UID):
        can = "point it elsewhere" if stat.S_ISLNK(st.st_mode) else "rename anything below it"
        raise ValueError(
            f"{path} is owned by uid {st.st_uid} (neither us, uid {uid}, nor root): its owner "
            f"can {can}. Use a path under directories owned by you or root"
        )
    if stat.S_ISLNK(st.st_mode):
        # A link in a sticky directory can be replaced by its owner (checked above); in any
        # other, only by the directory's owner (checked one step earlier). What it leads to
        # needs the same checks as any path.
        real = Path(os.path.realpath(path))
        _check_chain(real, uid)
        return real
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is not a directory: use another path")
    # With the sticky bit, only an entry's owner can rename or remove it. That is why, below
    # /tmp or /dev/shm (root's, 1777), only the first component matters: if it is ours and
    # nobody else can write it, nobody else can touch anything below it. A component we
    # create there is ours and 0700; an existing one must pass these checks. Without the
    # sticky bit, anyone who can write the directory can swap our entry for theirs.
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ValueError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can write it "
            f"and it is not sticky, so they can rename anything in it. Run `chmod go-w "
            f"{path}`, or use a path under directories only you or root can write"
        )
    return path


def _check_chain(path: Path, uid: int) -> None:
    """Every component of an existing ``path`` passes ``_check_ancestor``."""
    cur = Path(path.anchor)
    _check_ancestor(cur, os.lstat(cur), uid)
    for part in path.parts[1:]:
        cur = _check_ancestor(cur / part, os.lstat(cur / part), uid)
