"""Feature and data specs: kinds read off the arrays, and every dataset type's spec built by the same
code (what models are built from)."""

import numpy as np
import pytest

from mvhan_jax.data.types import InteractionData
from mvhan_jax.features import DataSpec, FeatureSpec, data_spec, feature_specs
from mvhan_jax.ranking import data as ranking_data
from mvhan_jax.seminar import data as sdata


def test_feature_specs_read_kinds_and_reject_bad_features():
  feats = {"age": np.array([0, 2], np.int32), "tags": np.array([[1, 0], [2, 3]], np.int32),
           "vec": np.zeros((2, 5), np.float32)}
  assert feature_specs(feats, {"age": 3, "tags": 4}) == (
      FeatureSpec("age", "categorical", 3), FeatureSpec("tags", "multi", 4), FeatureSpec("vec", "dense", 5))
  with pytest.raises(ValueError, match=r"vocab\['age'\]"):
    feature_specs({"age": feats["age"]}, {})
  with pytest.raises(ValueError, match="outside"):
    feature_specs({"age": feats["age"]}, {"age": 2})
  with pytest.raises(ValueError, match="float"):
    feature_specs({"vec": np.zeros(2, np.float32)}, {})


def _interactions(**kw):
  kw = dict(dict(name="tiny", num_users=2, num_items=12, user_features={"occupation": np.array([1, 2], np.int32)},
                 item_features={"genre": np.arange(12, dtype=np.int32) % 3}, vocab={"occupation": 22, "genre": 3},
                 user=np.repeat(np.arange(2), 5).astype(np.int32), item=np.arange(10, dtype=np.int32),
                 timestamp=np.arange(10, dtype=np.int64), rating=np.full(10, 5.0, np.float32)), **kw)
  return InteractionData(**kw)


def test_interaction_data_spec():
  data = _interactions()
  assert data.spec == DataSpec(name="tiny", num_users=2, num_items=12,
                               user_specs=(FeatureSpec("occupation", "categorical", 22),),
                               item_specs=(FeatureSpec("genre", "categorical", 3),))
  assert data.spec.item_spec("genre").size == 3 and data.spec.item_spec("type") is None
  assert data.spec.num_scenarios == 0
  with pytest.raises(ValueError, match="outside"):  # still validated when the dataset is built
    _interactions(vocab={"occupation": 22, "genre": 2})


def test_ranking_data_spec_holds_the_scenarios():
  d = ranking_data.movielens_ranking(_interactions(), maxlen=5, num_negatives=1, eval_negatives=1)
  names = tuple(n for n, _ in ranking_data.ML_SCENARIOS)
  base = data_spec("ml-100k", 2, 12, d.user_features, d.item_features, d.vocab)
  assert d.spec == DataSpec(**{**base.__dict__, "scenario_names": names})
  assert d.spec.num_scenarios == d.num_scenarios == 4


def test_seminar_data_spec_holds_modalities_and_keywords():
  user = np.repeat(np.arange(3), 4)
  item = np.arange(12) % 5
  query = np.zeros((12, 2), np.int32)
  vectors = {"text": np.ones((5, 3), np.float32), "image": np.ones((5, 2), np.float32)}
  d = sdata._assemble("toy", 5, 7, ("id", "text", "image"), vectors, user, item, np.arange(12), query, 3, 0)  # pylint: disable=protected-access
  assert d.spec == DataSpec(name="toy", num_users=3, num_items=5,
                            item_specs=(FeatureSpec("text", "dense", 3), FeatureSpec("image", "dense", 2)),
                            num_keywords=7, modality_names=("id", "text", "image"))
