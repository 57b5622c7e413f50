"""host_memory.configure: a CPU step's temporary buffer reuses the process's pages instead of
page-faulting fresh ones each call, and the numbers do not change.

Each case runs in its own Python process: the settings are per process and must come before JAX's
first computation (this test process has long since started JAX).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MV-HAN's training step (synthetic world, smoke sizes) at batch 2,048, whose temporary buffer is
# ~113 MB (above the 64 MB a thread arena can hold), fed as the training loop feeds it; prints the
# minor page faults per step after the heap has grown to its steady size.
FAULTS = textwrap.dedent("""
    import json, resource, sys
    from mvhan_jax import host_memory
    done = host_memory.configure(enabled=sys.argv[1] == "on")
    import jax
    from mvhan_jax import configs, train
    from mvhan_jax.data import pipeline
    from mvhan_jax.tasks import retrieval as rtask
    cfg = configs.load_config("experiments/configs/mvhan_synthetic.py:pooled,smoke")
    cfg.batch_size = 2048
    exp = rtask.build_experiment(cfg)
    tx = train.make_optimizer(cfg.optimizer, 100)
    key = jax.random.key(0)
    state = rtask.init_state(exp, tx, key)
    step = rtask.make_train_step(exp, tx)
    batches = pipeline.iterate(rtask.train_dataset(exp, cfg.batch_size, 0), 0, prefetch=2)
    compiled = step.lower(state, jax.device_put(next(batches)), exp.tables, key).compile()
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20

    def steps(n, state):
      for _ in range(n):
        state, m = step(state, host_memory.ready(jax.device_put(next(batches))), exp.tables, key)
      jax.block_until_ready(m)
      return state

    state = steps(3, state)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state = steps(5, state)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5
    print(json.dumps({"done": done, "faults": faults, "temp_mb": temp_mb}))
""")

# Four training steps of the two-tower smoke config; prints the losses and a parameter checksum.
NUMBERS = textwrap.dedent("""
    import json, sys
    from mvhan_jax import host_memory
    host_memory.configure(enabled=sys.argv[1] == "on")
    import jax, numpy as np
    from mvhan_jax import configs, train
    from mvhan_jax.data import pipeline
    from mvhan_jax.tasks import retrieval as rtask
    cfg = configs.load_config("experiments/configs/two_tower_synthetic.py:smoke")
    exp = rtask.build_experiment(cfg)
    tx = train.make_optimizer(cfg.optimizer, 100)
    key = jax.random.key(0)
    state = rtask.init_state(exp, tx, key)
    step = rtask.make_train_step(exp, tx)
    batches = pipeline.iterate(pipeline.train_batches(exp.train_source, cfg.batch_size, seed=0), 0, prefetch=2)
    losses = []
    for _ in range(4):
      state, m = step(state, host_memory.ready(jax.device_put(next(batches))), exp.tables, key)
      losses.append(float(m["loss"]))
    total = float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(state.params)))
    print(json.dumps({"losses": losses, "params_sum": total}))
""")


def _run(script: str, mode: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device: a step on several runs on worker threads
  out = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the settings change glibc's malloc only")
def test_configured_steps_stop_page_faulting():
  off, on = _run(FAULTS, "off"), _run(FAULTS, "on")
  assert on["temp_mb"] > 64, on  # what the test is about: more than a thread arena holds
  assert off["done"] == {"malloc": "unchanged", "cpu_dispatch": "unchanged"}
  assert on["done"] == {"malloc": "glibc: no mmap, no trim", "cpu_dispatch": "synchronous"}
  if off["faults"] < 2_000:
    pytest.skip(f"this system does not fault a fresh step's pages ({off['faults']:.0f} faults per call without the "
                "settings), so there is nothing to remove")
  # ~113 MB of temporaries is ~29,000 pages of 4 KiB faulted per step without the settings.
  assert on["faults"] < off["faults"] / 20, (on, off)


def test_configured_steps_give_the_same_numbers():
  off, on = _run(NUMBERS, "off"), _run(NUMBERS, "on")
  assert on == off
  assert len(set(on["losses"])) == 4  # the steps trained


def test_configure_after_jax_started_keeps_async_dispatch_and_says_so():
  script = textwrap.dedent("""
      import json
      import jax.numpy as jnp
      jnp.ones(3).block_until_ready()
      from mvhan_jax import host_memory
      print(json.dumps(host_memory.configure(enabled=True)))
  """)
  done = _run(script, "on")
  assert done["cpu_dispatch"] == "async (too late to change)"
