"""experiments/order_probe.py: the perturbed histories behind experiments/results/mvhan_quality.md."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("order_probe", os.path.join(ROOT, "experiments", "order_probe.py"))
order_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(order_probe)


def test_perturbations_by_hand():
  # Left-aligned, most recent at len-1; 0 pads (item 0 is real, but beyond history_len).
  history = np.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0]], np.int32)
  history_len = np.array([7, 2, 1], np.int32)
  out = order_probe.perturbations(history, history_len, k=3, seed=0)
  assert list(out) == ["as trained", "drop last item", "last item only", "swap last two", "shuffle last 3",
                       "shuffle older (last 3 kept)"]
  np.testing.assert_array_equal(out["drop last item"][1], [6, 1, 1])  # a one-item history keeps its item
  last_h, last_n = out["last item only"]
  np.testing.assert_array_equal(last_h[:, 0], [7, 9, 5])
  assert (last_h[:, 1:] == 0).all() and (last_n == 1).all()
  np.testing.assert_array_equal(out["swap last two"][0][:2], [[1, 2, 3, 4, 5, 7, 6], [9, 8, 0, 0, 0, 0, 0]])
  recent = out["shuffle last 3"][0]
  np.testing.assert_array_equal(recent[0, :4], [1, 2, 3, 4])         # older items in place
  assert sorted(recent[0, 4:]) == [5, 6, 7]                           # the last 3 permuted among themselves
  older = out["shuffle older (last 3 kept)"][0]
  np.testing.assert_array_equal(older[0, 4:], [5, 6, 7])
  assert sorted(older[0, :4]) == [1, 2, 3, 4]
  np.testing.assert_array_equal(older[1:], history[1:])               # nothing older than the last 3
  for name, (h, n) in out.items():                                    # the input is never modified
    assert h is history or not np.shares_memory(h, history), name
  np.testing.assert_array_equal(history[0], [1, 2, 3, 4, 5, 6, 7])
