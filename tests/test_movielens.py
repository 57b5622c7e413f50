"""MovieLens-100k loading: both raw formats agree, hand-checked features, the real data's known rows."""

import os

import numpy as np
import pytest

from mvhan_jax.data import movielens

# ---- A tiny copy written in both formats (same content). -------------------------------------

FLAGS = {g: k for k, g in enumerate(movielens.GENRES)}


def _flags(*genres):
  f = ["0"] * len(movielens.GENRES)
  for g in genres:
    f[FLAGS[g]] = "1"
  return "|".join(f)


GL_ITEMS = [
    f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Children' + chr(39) + 's', 'Comedy')}",
    f"2|Nosferatu (Nosferatu, eine Symphonie des Grauens) (1922)|01-Jan-1922||http://x|{_flags('Horror')}",
    f"3|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags('Drama', 'Musical')}",
    f"5|unknown||||{_flags('unknown')}",
    f"7|Land Before Time III: The Time of the Great Giving (1995) (V)|01-Jan-1995||http://x|"
    f"{_flags('Animation', 'Children' + chr(39) + 's')}",
]
RB_ITEMS = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "1\tToy Story\t1995\tAnimation Children's Comedy",
    "2\tNosferatu (Nosferatu, eine Symphonie des Grauens)\t1922\tHorror",
    "3\tMisérables, Les\t1995\tDrama Musical",
    "5\tunkonwn\tunkonwn\tunknown",
    "7\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's",
]
USERS = [("1", "24", "M", "technician", "85711"), ("4", "17", "F", "student", "T8H1N"),
         ("9", "56", "M", "none", "01002")]
RATINGS = [("9", "3", "4", "100"), ("1", "1", "5", "50"), ("4", "7", "3", "70"), ("1", "2", "2", "50"),
           ("4", "5", "1", "60")]


def _write(path, lines, encoding):
  with open(path, "wb") as f:
    f.write(("\n".join(lines) + "\n").encode(encoding))


@pytest.fixture
def fake_dirs(tmp_path):
  gl, rb = tmp_path / "gl", tmp_path / "rb"
  gl.mkdir()
  rb.mkdir()
  _write(gl / "u.item", GL_ITEMS, "latin-1")  # GroupLens is latin-1 ...
  _write(gl / "u.user", ["|".join(u) for u in USERS], "latin-1")
  _write(gl / "u.data", ["\t".join(r) for r in RATINGS], "latin-1")
  _write(rb / "ml-100k.item", RB_ITEMS, "utf-8")  # ... RecBole re-encoded it as UTF-8.
  _write(rb / "ml-100k.user", ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
         + ["\t".join(u) for u in USERS], "utf-8")
  # Rows in another order: the loader must canonicalise.
  _write(rb / "ml-100k.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
         + ["\t".join(r) for r in reversed(RATINGS)], "utf-8")
  return str(gl), str(rb)


def _assert_same(a, b):
  assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
  for f in ("user", "item", "timestamp", "rating"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert getattr(a, f).dtype == getattr(b, f).dtype, f
  for fa, fb in ((a.user_features, b.user_features), (a.item_features, b.item_features)):
    assert fa.keys() == fb.keys()
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
      assert fa[k].dtype == fb[k].dtype == np.int32, k
  assert dict(a.vocab) == dict(b.vocab)
  assert a.item_titles == b.item_titles


def test_both_formats_give_identical_arrays(fake_dirs):
  _assert_same(movielens.parse_grouplens(fake_dirs[0]), movielens.parse_recbole(fake_dirs[1]))


def test_hand_computed_values(fake_dirs):
  d = movielens.parse_recbole(fake_dirs[1])
  # Raw users 1, 4, 9 -> 0, 1, 2; raw items 1, 2, 3, 5, 7 -> 0..4; rows by (user, time, item),
  # the tie of user 1 at t=50 broken by item id.
  assert (d.num_users, d.num_items) == (3, 5)
  np.testing.assert_array_equal(d.user, [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(d.item, [0, 1, 3, 4, 2])
  np.testing.assert_array_equal(d.timestamp, [50, 50, 60, 70, 100])
  np.testing.assert_array_equal(d.rating, [5, 2, 1, 3, 4])
  np.testing.assert_array_equal(d.user_features["age"], [2, 1, 7])         # 24, 17, 56
  np.testing.assert_array_equal(d.user_features["gender"], [2, 1, 2])      # M, F, M
  np.testing.assert_array_equal(d.user_features["occupation"], [20, 19, 13])  # technician, student, none
  np.testing.assert_array_equal(d.user_features["zip"], [9, 11, 1])        # '8', 'T' (non-digit), '0'
  # Action=1 ... Animation=3, Children's=4, Comedy=5, Drama=8, Horror=11, Musical=12; "unknown" -> no genre.
  np.testing.assert_array_equal(d.item_features["genres"],
                                [[3, 4, 5], [11, 0, 0], [8, 12, 0], [0, 0, 0], [3, 4, 0]])
  np.testing.assert_array_equal(d.item_features["year"], [16, 1, 16, 0, 16])  # 1995-99, 1920-24, none
  # Word ids by (-count, word): nosferatu, the, time (x2) = 1, 2, 3; then alphabetical from 4:
  # before des eine giving grauens great iii land les misérables of story symphonie toy unknown v.
  np.testing.assert_array_equal(d.item_features["title"], [
      [17, 15, 0, 0, 0, 0, 0, 0],           # toy story
      [1, 1, 6, 16, 5, 8, 0, 0],            # nosferatu nosferatu eine symphonie des grauens
      [13, 12, 0, 0, 0, 0, 0, 0],           # misérables les
      [18, 0, 0, 0, 0, 0, 0, 0],            # unknown
      [11, 4, 3, 10, 2, 3, 14, 2],          # land before time iii the time of the | (great giving v cut)
  ])
  assert d.vocab["title"] == 20 and d.vocab["genres"] == 19 and d.vocab["year"] == 17
  assert d.item_titles == ("Toy Story (1995)", "Nosferatu (Nosferatu, eine Symphonie des Grauens) (1922)",
                           "Misérables, Les (1995)", "unknown",
                           "Land Before Time III: The Time of the Great Giving (1995) (V)")


@pytest.mark.parametrize("age,bucket", [(None, 0), (1, 1), (17, 1), (18, 2), (24, 2), (25, 3), (34, 3),
                                        (35, 4), (44, 4), (45, 5), (49, 5), (50, 6), (55, 6), (56, 7), (73, 7)])
def test_age_bucket_edges(age, bucket):
  assert movielens.age_bucket(age) == bucket


def test_local_recbole_copy_with_wrong_sha256_is_rejected(tmp_path, fake_dirs):
  # The fake files are a valid RecBole copy but not the published one: their digest must not pass.
  cache = tmp_path / "root" / "ml-100k"
  cache.mkdir(parents=True)
  for n in movielens.RECBOLE_FILES:
    with open(os.path.join(fake_dirs[1], n), "rb") as src, open(cache / n, "wb") as dst:
      dst.write(src.read())
  with pytest.raises(ValueError, match=r"ml-100k\.inter has sha256 .* expected 4edb74e2.*delete it"):
    movielens.load_movielens_100k(str(tmp_path / "root"))


def test_local_grouplens_copy_with_wrong_row_count_is_rejected(tmp_path, fake_dirs):
  cache = tmp_path / "root" / "ml-100k"
  cache.mkdir(parents=True)
  for n in movielens.GROUPLENS_FILES:
    with open(os.path.join(fake_dirs[0], n), "rb") as src, open(cache / n, "wb") as dst:
      dst.write(src.read())
  with pytest.raises(ValueError, match=r"\(users, items, ratings\) = \(3, 5, 5\), expected \(943, 1682, 100000\)"):
    movielens.load_movielens_100k(str(tmp_path / "root"))


# ---- The real data (downloaded once into the default data dir). --------------------------------

@pytest.fixture(scope="module")
def real():
  try:
    return movielens.load_movielens_100k()
  except RuntimeError as e:  # no source reachable on this machine
    pytest.skip(f"MovieLens-100k unavailable: {e}")


def test_real_sizes_and_known_rows(real):
  assert (real.num_users, real.num_items, len(real.user)) == (943, 1682, 100000)
  # u.data line 1: user 196 rated item 242 with 3 at 881250949 (dense ids are raw - 1).
  m = (real.user == 195) & (real.item == 241)
  assert m.sum() == 1
  assert real.rating[m][0] == 3.0 and real.timestamp[m][0] == 881250949
  assert real.item_titles[0] == "Toy Story (1995)"
  g = real.item_features["genres"][0]
  assert {movielens.GENRES[k] for k in g[g > 0]} == {"Animation", "Children's", "Comedy"}
  assert real.timestamp.dtype == np.int64 and real.rating.dtype == np.float32
  assert set(np.unique(real.rating)) == {1.0, 2.0, 3.0, 4.0, 5.0}
  # Every user of ml-100k has >= 20 ratings.
  assert np.bincount(real.user, minlength=943).min() >= 20
  assert real.user_features["gender"].min() >= 1 and real.user_features["occupation"].min() >= 1
  # Only item 267 ("unknown") lacks a year.
  assert list(np.flatnonzero(real.item_features["year"] == 0)) == [266]


def test_real_cached_copy_reparses_identically(real):
  # The cache now holds one format; re-parsing it directly must give the loader's arrays.
  cache = os.path.join(movielens.default_data_dir(), "ml-100k")
  parse = (movielens.parse_grouplens if os.path.exists(os.path.join(cache, "u.data"))
           else movielens.parse_recbole)
  _assert_same(real, parse(cache))


def test_no_source_gives_one_error_listing_every_source(tmp_path, monkeypatch):
  # Unreachable URL (connection refused at once) and an invalid pip requirement (fails offline).
  monkeypatch.setattr(movielens, "GROUPLENS_URL", "http://127.0.0.1:9/ml-100k.zip")
  monkeypatch.setattr(movielens, "RECBOLE_REQUIREMENT", "recbole===not a version")
  with pytest.raises(RuntimeError) as err:
    movielens.load_movielens_100k(str(tmp_path))
  msg = str(err.value)
  assert "(a) local copy: no complete copy" in msg
  assert "(b) http://127.0.0.1:9/ml-100k.zip: URLError" in msg
  assert "(c) the ml-100k copy inside the PyPI wheel recbole===not a version: RuntimeError" in msg
  assert f"unzip u.data, u.item and u.user into {tmp_path}/ml-100k/" in msg
