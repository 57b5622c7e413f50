"""experiments/profile_mvhan.py: the per-part cost of MV-HAN's step behind experiments/results/bench/README.md."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("profile_mvhan", os.path.join(ROOT, "experiments", "profile_mvhan.py"))
profile_mvhan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_mvhan)


def test_parts_add_up_and_fel_flops_match_its_projections():
  B, K = 16, 3
  rows = profile_mvhan.profile(B, "experiments/configs/mvhan_ml100k.py:smoke,softmax=sampled",
                               [f"model.num_behaviour_tokens={K}"], repeats=1, trace=True)
  parts = {r["part"]: r for r in rows}
  assert list(parts) == ["user tower", "content tower", "user FEL", "user MLP", "content FEL", "content heads", "step"]
  assert all(r["gflop"] > 0 and r["ms"] > 0 and r["batch_size"] == B for r in rows)
  g = {name: r["gflop"] for name, r in parts.items()}
  # A tower's sub-parts are inside it, and both towers (forward + backward) inside the step.
  assert g["user FEL"] + g["user MLP"] <= g["user tower"]
  assert g["content FEL"] + g["content heads"] <= g["content tower"]
  assert g["user tower"] + g["content tower"] <= g["step"]
  # The user FEL's matmul flops by hand: per block, Q/K/V/out projections of T tokens (2 D^2 flops
  # per token each) and the two attention products (2 T^2 D each), forward + 2x for the backward.
  # The smoke model: d = 64 here, 1 FEL block; tokens = user id + 3 profile fields + pooled history + K.
  D, T, blocks = 64, 5 + K, 1
  matmul = blocks * 3 * B * (4 * 2 * T * D * D + 2 * 2 * T * T * D) / 1e9
  assert matmul <= g["user FEL"] <= 1.5 * matmul
  # The trace counts the step's compiled ops (runtime spans and Python calls left out) and names them
  # by kind without the numeric suffix.
  trace = parts["step"]["trace"]
  assert trace["ops_per_step"] >= 100
  kinds = trace["op_ms_by_kind"]
  assert not any(k.startswith(profile_mvhan._NOT_OPS) for k in kinds)  # pylint: disable=protected-access
  assert not any(k[-1].isdigit() for k in kinds) and any("fusion" in k for k in kinds)
