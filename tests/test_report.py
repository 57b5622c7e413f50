"""Results-table helpers: rows kept from an earlier run of a table script, in the script's order."""

from mvhan_jax import report
from mvhan_jax.tables import mean_std_table


def test_rows_not_rerun_are_kept_in_table_order(tmp_path):
  path = str(tmp_path / "t.md")
  old = mean_std_table({"A": [{"HR@10": 0.1}], "B": [{"HR@10": 0.2}, {"HR@10": 0.4}], "C": [{"HR@10": 0.3}]},
                       ("HR@10",))
  report.write_markdown(path, "# t\n\n" + old + "\nprose | B | is not a row\n")
  kept = report.kept_rows(path, ["B", "C", "missing"])
  assert set(kept) == {"B", "C"} and "0.3000" in kept["B"] and kept["B"].startswith("| B |")
  new = mean_std_table({"A": [{"HR@10": 0.5}], "D": [{"HR@10": 0.6}]}, ("HR@10",))
  merged = report.merge_rows(new, kept, ["D", "C", "B", "A"]).splitlines()
  assert merged[:2] == new.splitlines()[:2]                     # the header of the new table
  assert [line.split("|")[1].strip() for line in merged[2:]] == ["D", "C", "B", "A"]
  assert "0.5000" in merged[5] and merged[3] == kept["C"]        # a rerun row wins over a kept one
  assert report.kept_rows(str(tmp_path / "missing.md"), ["A"]) == {}


def test_xla_cost_of_a_matmul_by_hand():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = jnp.ones((32, 48)), jnp.ones((48, 16))
  cost = report.xla_cost(jax.jit(jnp.matmul).lower(a, b).compile())
  assert cost["flops"] == 2 * 32 * 48 * 16
  assert cost["bytes_accessed"] >= 4 * (32 * 48 + 48 * 16 + 32 * 16)  # read both, write the product
