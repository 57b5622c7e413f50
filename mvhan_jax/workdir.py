"""Reads and writes of a workdir, local or in a bucket (``--workdir=gs://bucket/runs/x``).

Everything goes through `etils.epath` (orbax's path layer): ``gs://``, ``s3://``, ``az://`` and
``hf://`` URIs go to fsspec (gcsfs, s3fs, ...; TensorFlow's gfile instead when TF is installed), any
other string is a local path. A plain ``open()`` would treat ``gs://b/x`` as the relative path
``gs:/b/x`` and write into a local folder named ``gs:``.

Object stores differ from a disk in ways the helpers hide:
* no appends: gcsfs silently turns mode 'a' into 'w' (the file then holds the last write only), so
  append-only logs are rewritten whole (see `metrics_writer.MetricsWriter`);
* no directories: a "folder" exists once a file lies under it, so `makedirs` does nothing there
  (gcsfs's makedirs would only check for, or even create, the bucket);
* one object upload is atomic, so only local writes need write-then-rename.

Tools that only write to a local folder (ScaNN's serializer) use `local_dir_to_write` /
`local_dir_to_read`, which stage the files in a temporary folder when the destination is remote.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from etils import epath

PathLike = epath.PathLike


def path(p: PathLike) -> epath.Path:
  """``p`` as an `epath.Path` (local, or remote for a ``gs://``-like URI)."""
  try:
    return epath.Path(p)
  except KeyError:  # epath's own error for an unknown scheme is a bare KeyError('memory://')
    scheme = os.fspath(p).split("://", 1)[0]
    raise ValueError(f"{os.fspath(p)!r}: epath handles no {scheme}:// URIs; use a local path or "
                     "gs://, s3://, az://, hf://") from None


def is_local(p: PathLike) -> bool:
  """False for a URI (``scheme://...``): epath sends those to a remote filesystem."""
  return "://" not in os.fspath(p)


def absolute(p: PathLike) -> epath.Path:
  """``p`` made absolute when local (what orbax wants), unchanged when a URI: os.path.abspath and
  epath's resolve() would turn ``gs://b/x`` into ``<cwd>/gs:/b/x``."""
  return path(os.path.abspath(p) if is_local(p) else p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def makedirs(p: PathLike) -> epath.Path:
  """Creates the folder ``p`` and its parents locally (no-op on object stores); returns ``path(p)``."""
  out = path(p)
  if is_local(p):
    out.mkdir(parents=True, exist_ok=True)
  return out


def write_text(p: PathLike, text: str) -> None:
  """Writes ``p`` whole (creating a local parent folder); readers never see a half-written file."""
  p = path(p)
  if not is_local(p):
    p.write_text(text)  # one object upload: atomic already
    return
  makedirs(p.parent)
  tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, p)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_json(p: PathLike, obj: Any, indent: int | None = 2, **dump_kwargs) -> None:
  write_text(p, json.dumps(obj, indent=indent, **dump_kwargs))


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under ``src`` to the same place under ``dst``, overwriting; either side may
  be local or remote. Files already in ``dst`` and absent from ``src`` are kept."""
  src, dst = path(src), path(dst)
  makedirs(dst)
  # iterdir, not Path.walk: epath's fsspec walk yields roots without their gs:// prefix.
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:
      child.copy(dst / child.name, overwrite=True)


@contextlib.contextmanager
def local_dir_to_write(dest: PathLike) -> Iterator[str]:
  """A local folder whose files end up in ``dest``: ``dest`` itself when local, else a temporary
  folder copied to ``dest`` when the block exits normally (an exception copies nothing)."""
  if is_local(dest):
    makedirs(dest)
    yield os.fspath(dest)
    return
  with tempfile.TemporaryDirectory(prefix="mvhan_stage_") as tmp:
    yield tmp
    copy_tree(tmp, dest)


@contextlib.contextmanager
def local_dir_to_read(src: PathLike) -> Iterator[str]:
  """A local folder holding the files of ``src``: ``src`` itself when local, else a temporary copy
  deleted when the block exits (so whatever reads it must be done by then)."""
  if is_local(src):
    yield os.fspath(src)
    return
  with tempfile.TemporaryDirectory(prefix="mvhan_stage_") as tmp:
    copy_tree(src, tmp)
    yield tmp
