"""Where a run's files live: a local (or mounted) folder, or Google Cloud Storage (``gs://``).

A workdir or ``config.data_dir`` given as ``gs://bucket/path`` goes through
``etils.epath`` (the path layer orbax and TFDS use; gcsfs underneath, the ``gcs`` extra);
every other URL scheme is refused before anything is written. What object storage lacks
is spelled out here, once:

- **No append.** :func:`append_text` rewrites the object (metrics logs are small).
- **No folder rename.** :func:`move` copies the objects, then deletes the originals.
- **No local reads for array_record.** TFDS's array_record files are read through a local
  copy (:func:`local_copy`), made once and checked by file sizes: grain reads records at
  random, which a bucket serves slowly, and array_record opens only local files.
- **Writes are whole.** An object appears complete or not at all, so :func:`write_atomic`
  writes it directly where a local file goes through a temporary and a rename.

``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL`` (orbax's TensorStore)
point both at a stand-in of the service; the tests use one on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

OBJECT_STORE_SCHEMES = ("gs",)
DATASET_INFO = "dataset_info.json"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsupportedStorage(ValueError):
    """A URL scheme kpn-jax cannot read or write (only ``gs://`` is supported)."""


def scheme(path) -> str | None:
    """``'gs'`` for ``gs://bucket/x``; None for a local path."""
    match = _URL.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return match.group(1).lower() if match else None


def is_object_store(path) -> bool:
    return scheme(path) in OBJECT_STORE_SCHEMES


def check_supported(path, what: str) -> None:
    """Raises :class:`UnsupportedStorage` naming ``what`` (a flag or config field) when
    ``path`` is a URL of another scheme than ``gs://``."""
    found = scheme(path)
    if found is not None and found not in OBJECT_STORE_SCHEMES:
        raise UnsupportedStorage(
            f"{what}={path}: {found}:// is not supported; use a local or mounted folder or "
            f"gs://bucket/path (Google Cloud Storage)")


def path(location):
    """The path object for ``location``: ``etils.epath.Path`` for ``gs://``, else an
    absolute ``pathlib.Path`` (``~`` expanded). Both offer ``/``, ``read_text``,
    ``write_text``, ``exists``, ``mkdir``, ``open``, ``glob``, ``iterdir``, ``unlink``."""
    check_supported(location, "path")
    if is_object_store(location):
        from etils import epath

        return epath.Path(os.fspath(location))
    return Path(location).expanduser().resolve()


def write_atomic(target, data: str | bytes) -> None:
    """Writes ``target`` so that a reader sees the old content or the new, never a part."""
    payload = data.encode() if isinstance(data, str) else data
    if is_object_store(target):
        target.write_bytes(payload)
        return
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    temporary.write_bytes(payload)
    os.replace(temporary, target)


def create_exclusive(target, data: str) -> None:
    """Creates the file ``target`` holding ``data``, atomically; raises FileExistsError when
    it exists (``O_EXCL`` locally; on gs://, an upload the service refuses when the object
    exists, the ``ifGenerationMatch=0`` precondition)."""
    if is_object_store(target):
        filesystem, key = _filesystem(), _bucket_key(target)
        filesystem.invalidate_cache(key)
        if filesystem.exists(key):  # the common case, without relying on the precondition
            raise FileExistsError(os.fspath(target))
        filesystem.pipe_file(key, data.encode(), mode="create")
        return
    descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as f:
        f.write(data)


def append_text(target, text_to_add: str) -> None:
    """Appends to a file; on object storage, rewrites the object with the text added."""
    if is_object_store(target):
        old = target.read_text() if target.exists() else ""
        target.write_text(old + text_to_add)
        return
    with Path(target).open("a") as f:
        f.write(text_to_add)


def _filesystem():
    import fsspec

    try:
        return fsspec.filesystem("gs")
    except ImportError as error:
        raise UnsupportedStorage("gs:// paths need gcsfs: pip install 'kpn-jax[gcs]'") from error


def _bucket_key(location) -> str:
    return os.fspath(location).split("://", 1)[1].rstrip("/")


def move(source, target) -> None:
    """Moves a file or folder ``source`` to ``target`` (same storage)."""
    if is_object_store(source):
        filesystem, old, new = _filesystem(), _bucket_key(source), _bucket_key(target)
        names = files_under(source) or {"": 0}  # a folder's files, or the file itself
        for name in names:
            filesystem.copy(f"{old}/{name}".rstrip("/"), f"{new}/{name}".rstrip("/"))
        filesystem.rm([f"{old}/{name}".rstrip("/") for name in names])
    else:
        Path(source).rename(target)


def files_under(location) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under the folder ``location``."""
    if is_object_store(location):
        root = _bucket_key(location)
        return {name[len(root) + 1:]: int(info.get("size", 0))
                for name, info in _filesystem().find(root, detail=True).items()
                if info.get("type") != "directory" and name != root}
    root = Path(location)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
            if p.is_file()}


def local_copy(remote_dir, local_dir: Path) -> Path:
    """A local copy of the folder ``remote_dir`` (gs://) in ``local_dir``: only files that
    are missing there or differ in size are downloaded. Returns ``local_dir``."""
    wanted = files_under(remote_dir)
    if not wanted:
        raise FileNotFoundError(f"{os.fspath(remote_dir)}: no files there")
    present = files_under(local_dir) if Path(local_dir).is_dir() else {}
    filesystem = _filesystem()
    root = _bucket_key(remote_dir)
    for name, size in sorted(wanted.items()):
        if present.get(name) != size:
            destination = Path(local_dir) / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f"{destination.name}.{os.getpid()}.partial")
            filesystem.get_file(f"{root}/{name}", str(partial))
            os.replace(partial, destination)
    return Path(local_dir)


def upload(local_dir: Path, remote_dir) -> None:
    """Copies every file under the local folder ``local_dir`` to ``remote_dir`` (gs://);
    TFDS's ``dataset_info.json`` files last, so that a dataset interrupted on its way up is
    not taken for a built one (:func:`holds_dataset`)."""
    filesystem = _filesystem()
    root = _bucket_key(remote_dir)
    for name in sorted(files_under(local_dir), key=lambda n: (n.endswith(DATASET_INFO), n)):
        filesystem.put_file(str(Path(local_dir) / name), f"{root}/{name}")


def holds_dataset(location) -> bool:
    """Whether the folder ``location`` holds a built TFDS dataset (its ``dataset_info.json``)."""
    return any(name.endswith(DATASET_INFO) for name in files_under(location))


def cache_folder(remote_dir, cache_root: str | os.PathLike) -> Path:
    """Where the local copy of ``remote_dir`` lives: ``cache_root/<bucket>/<path>``."""
    return Path(cache_root).expanduser().resolve() / _bucket_key(remote_dir)
