"""The train state's shardings: AdamW moments live where their parameters live."""
import jax
import optax

from distillm2_jax import models
from distillm2_jax import sharding as shd
from distillm2_jax.train.loop import init_state, train_state_shardings
from tests.tiny_models import hf_config


def test_adam_moments_are_sharded_like_their_parameters_under_fsdp():
    mesh = shd.make_mesh((1, 8, 1))
    params = models.from_config(hf_config("qwen2", hidden_size=64), mesh=mesh).params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = jax.jit(lambda t: init_state(t, tx), out_shardings=train_state_shardings(params, tx))(params)
    adam = state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(moments)):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim), path
    embed = state.opt_state[1][0].mu["embed"]
    assert embed.sharding.spec != jax.sharding.PartitionSpec() and len(embed.addressable_shards) == 8
