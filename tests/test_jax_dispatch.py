"""jax expert dispatch: the one-assignment path (a decode step) equals the tiled one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from workbench.jax import moe


def _experts(E: int = 5, D: int = 16, inter: int = 12):
    rng = np.random.default_rng(0)
    return [(jnp.asarray(rng.standard_normal((2 * inter, D), np.float32) / D ** 0.5),
             jnp.asarray(rng.standard_normal((D, inter), np.float32) / inter ** 0.5))
            for _ in range(E)]


def test_single_assignment_matches_tiles_and_ignores_ids_outside_the_group():
    experts = _experts()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16), np.float32))
    gates = jnp.asarray([[0.7]], jnp.float32)
    for e in range(len(experts)):
        idx = jnp.asarray([[e]], jnp.int32)
        one = moe.dispatch_rows(x, idx, gates, experts, 1)
        # the same assignment with a second (ignored) one goes through the tiled loop
        two = moe.dispatch_rows(jnp.concatenate([x, x]), jnp.asarray([[e], [-1]], jnp.int32),
                                jnp.concatenate([gates, gates]), experts, 1)
        np.testing.assert_allclose(np.asarray(one[0]), np.asarray(two[0]), rtol=1e-6,
                                   atol=1e-6)
        assert not np.asarray(two[1]).any()
    for outside in (-1, len(experts)):
        y = moe.dispatch_rows(x, jnp.asarray([[outside]], jnp.int32), gates, experts, 1)
        assert y.shape == (1, 16) and not np.asarray(y).any()
