"""Outputs that appear whole or not at all: write beside the destination, rename when complete.

    with atomic_output("out/model.ckpt") as tmp:   # tmp: a path beside the destination
        torch.save(obj, tmp)                       # a file or a directory
    # renamed to out/model.ckpt only if the block finished; on any error (or a kill before
    # the rename) the destination is untouched and the temporary path is removed

A directory that cannot be written is refused before the work (OSError naming it), and a
writing library's failure text (torch, safetensors: no space, permission denied) becomes the
OSError it reports. A finished output gets the usual permissions for new files (0666 or 0777 under the umask),
whatever the writing library chose for its temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid


def check_free(path: str, overwrite: bool) -> None:
    """FileExistsError unless `path` is free or may be replaced."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(path: str) -> None:
    """Files 0666 and directories 0777, both under the umask (temporary files are often 0600)."""
    mask = _umask()
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# Writers outside Python's io (torch's zip writer, safetensors' Rust code) report a failed
# write as RuntimeError / SafetensorError text; these phrases give back the OSError it was.
LIBRARY_OS_ERRORS = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                     ("Permission denied", errno.EACCES), ("os error 13", errno.EACCES),
                     ("Read-only file system", errno.EROFS), ("os error 30", errno.EROFS))


def check_writable(directory: str) -> None:
    """The OSError (naming `directory`, or its nearest existing ancestor) that writing a new
    file there would raise, raised now:
    before any work, and in one line rather than a writing library's own error."""
    while not os.path.exists(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)  # the ancestor a new directory would be made in
    probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise type(error)(error.errno, error.strerror, directory) from None
    os.remove(probe)


def _as_os_error(error: BaseException, where: str) -> OSError | None:
    if isinstance(error, OSError):
        return None
    text = str(error)
    for phrase, code in LIBRARY_OS_ERRORS:
        if phrase in text:
            return OSError(code, os.strerror(code), where)
    return None


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False):
    """Yields a temporary path beside `path`; renames it to `path` on success only.

    On any error the temporary path and the parent directories this created are removed,
    and an existing `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    check_free(path, overwrite)
    parent = os.path.dirname(path)
    created = []
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(parent, exist_ok=True)
        check_writable(parent)
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"internal error: nothing was written to {tmp}")
        _usual_modes(tmp)
        if os.path.lexists(path):
            check_free(path, overwrite)
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            remove(old)
        else:
            os.rename(tmp, path)
    except BaseException as error:
        remove(tmp)
        for directory in created:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        os_error = _as_os_error(error, parent)
        if os_error is not None:
            raise os_error from error
        raise
