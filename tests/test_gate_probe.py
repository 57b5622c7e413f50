"""experiments/gate_probe.py: the trained `gate` model with its heads switched off (mvhan_quality.md)."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gate_probe", os.path.join(ROOT, "experiments", "gate_probe.py"))
gate_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate_probe)


def test_cosine_by_hand_skips_zero_rows():
  a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
  b = np.array([[1.0, 1.0], [0.0, 5.0], [1.0, 0.0]])
  assert gate_probe._cosine(a, b) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)


def test_gates_closed_copies_and_zeroes_only_the_gates():
  params = {"params": {"user_gate": np.float32(0.3), "item_gate": np.float32(-0.2), "w": np.ones(2)}}
  closed = gate_probe.gates_closed(params)
  assert closed["params"]["user_gate"] == 0 and closed["params"]["item_gate"] == 0
  assert closed["params"]["w"] is params["params"]["w"]
  assert params["params"]["user_gate"] == np.float32(0.3)  # the trained parameters are not modified
  with pytest.raises(ValueError, match="no user_gate"):
    gate_probe.gates_closed({"params": {"w": np.ones(2)}})
