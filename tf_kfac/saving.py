"""Crash-safe `.keras` files: the new file is written beside the old one, then renamed onto it.

Keras's `model.save` opens a local `.keras` file with `open(path, "wb")`, which
empties the previous file, and then writes the new archive into it. A process
killed in between leaves a truncated file that `keras.models.load_model`
cannot read, and the previous model is lost with it. `save_model` writes the
same archive to a temporary file in the same directory and moves it onto the
path only once it is complete and on disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Any

import keras


def save_model(model: keras.Model, filepath: str | os.PathLike, overwrite: bool = True,
               **kwargs: Any) -> None:
    """Saves a model as a `.keras` file so that a crash never leaves a broken file.

    Writes exactly what `model.save(filepath)` writes (the architecture, the
    weights and the optimizer's full state: for `tf_kfac.KFAC` its factors,
    inverses, momentum and counters), but first to a temporary file in the
    same directory. That file is flushed to disk (`os.fsync`) and then renamed
    onto `filepath` with `os.replace`, which swaps the two in one step on
    POSIX file systems. A process killed at any point therefore leaves
    `filepath` either as it was before the call or complete with the new
    model, and `keras.models.load_model` reads either. If saving raises, the
    temporary file is removed and `filepath` is untouched.

    A process killed during the save can leave its temporary file behind,
    named like `.run.keras.<random>.tmp.keras` next to `run.keras`. It is
    incomplete and safe to delete.

    Only local paths are supported: a remote path such as `gs://...` raises a
    `ValueError`, because the rename this function relies on is an operation
    of the local file system. For a remote file, save locally with this
    function and copy the file, or call `model.save`, which builds a remote
    `.keras` file in memory and uploads it with a single write.

    Args:
        model: The Keras model to save.
        filepath: `str` or `pathlib.Path`, a local path ending in `.keras`.
            Its directory must exist. If it is a symbolic link, the file it
            points to is replaced, as `model.save` would write through the link.
            An existing file keeps its permission bits.
        overwrite: Whether to replace an existing file. With `False`, an
            existing file raises a `FileExistsError` (where `model.save` would
            ask on the terminal).
        **kwargs: Passed on to `model.save`, which treats them as for
            `model.save(filepath)`: `zipped` (`None` or `True`; `False`, which
            writes a directory instead of a file, raises a `ValueError`), and
            the deprecated `include_optimizer` and `save_format`.

    Raises:
        ValueError: `filepath` does not end in `.keras` or is a remote path,
            or `zipped=False`.
        FileExistsError: `overwrite=False` and `filepath` exists.
        FileNotFoundError: The directory of `filepath` does not exist.
        IsADirectoryError: `filepath` is a directory.

    Example:

    ```python
    model.fit(x, y, epochs=5)
    tf_kfac.save_model(model, "run.keras")    # instead of model.save("run.keras")
    model = keras.models.load_model("run.keras")
    ```
    """
    path = os.fsdecode(os.fspath(filepath))
    _check_arguments(path, kwargs)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(
            f"{path!r} exists and overwrite=False. Pass overwrite=True to replace it, or "
            "choose another path.")
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot save to {path!r}: the directory {directory!r} does not exist. "
            "Create it first (os.makedirs).")
    if os.path.isdir(target):
        raise IsADirectoryError(
            f"Cannot save to {path!r}: it is a directory. Pass the path of a file ending "
            "in .keras.")
    temporary = _new_temporary_file(directory, os.path.basename(target))
    try:
        model.save(temporary, overwrite=True, **kwargs)
        if os.path.exists(target):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        with open(temporary, "rb+") as f:  # model.save has flushed and closed it
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _sync_directory(directory)


def _check_arguments(path: str, kwargs: dict[str, Any]) -> None:
    if "://" in path:
        raise ValueError(
            f"tf_kfac.save_model writes local files only, and {path!r} is a remote path. "
            "Save to a local path and copy the file, or call model.save(path), which uploads "
            "a remote .keras file with a single write.")
    if not path.endswith(".keras"):
        raise ValueError(
            f"tf_kfac.save_model writes .keras files, and {path!r} does not end in .keras. "
            "Add the .keras extension to the path.")
    zipped = kwargs.get("zipped")
    if zipped is not None and not zipped:
        raise ValueError(
            "zipped=False saves a directory, not a .keras file; tf_kfac.save_model only "
            "writes .keras files. Leave zipped out, or call model.save(path, zipped=False) "
            "with a path that does not end in .keras.")


def _new_temporary_file(directory: str, name: str) -> str:
    """Creates an empty file of a new name in `directory`, with the usual permissions.

    The name ends in `.keras`, which `model.save` requires. Unlike
    `tempfile.mkstemp` (mode 0600), the mode is the one `open(path, "wb")`
    gives a new file, so the saved file is what `model.save` would create.
    """
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp.keras")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def _sync_directory(directory: str) -> None:
    """Writes the directory's entry for the renamed file to disk (POSIX only).

    Without it the rename is complete for every process, but a power failure
    right after it could still bring back the previous file.
    """
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems cannot sync a directory
            os.fsync(fd)
    finally:
        os.close(fd)
