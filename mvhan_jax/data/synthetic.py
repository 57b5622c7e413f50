"""Synthetic recommendation world with known ground truth: the public API.

Implementation: `synthetic_config` (WorldConfig and its validation), `synthetic_gen` (the seeded
block generators and the in-memory `SyntheticWorld`; its docstring describes the world), and
`synthetic_io` (msgpack records, ArrayRecord shards, Grain sources).

Typical use::

  world = generate_world(WorldConfig(num_users=1000, num_items=5000, seed=1))
  data = world.to_interaction_data()            # all types; or to_interaction_data('novel')
  meta = write_world(WorldConfig(num_users=10**6, num_items=10**7), '/data/world', 100_000)
  events = read_shards('/data/world', 'events')  # events[u] -> dict of user u's event arrays
"""

from mvhan_jax.data.synthetic_config import (KNOWN_ITEM_FIELDS, ContentTypeSpec, ScenarioSpec,
                                             WorldConfig, default_scenarios, default_types)
from mvhan_jax.data.synthetic_gen import (PROFILE_FIELDS, SyntheticWorld, WorldSkeleton,
                                          generate_item_block, generate_user_block,
                                          generate_world, item_vocab, make_skeleton, user_vocab)
from mvhan_jax.data.synthetic_io import (RECORD_KINDS, ShardSource, decode_record, encode_record,
                                         load_meta, read_shards, write_world)

__all__ = ["KNOWN_ITEM_FIELDS", "ContentTypeSpec", "ScenarioSpec", "WorldConfig",
           "default_scenarios", "default_types", "PROFILE_FIELDS", "SyntheticWorld",
           "WorldSkeleton", "generate_item_block", "generate_user_block", "generate_world",
           "item_vocab", "make_skeleton", "user_vocab", "RECORD_KINDS", "ShardSource",
           "decode_record", "encode_record", "load_meta", "read_shards", "write_world"]
