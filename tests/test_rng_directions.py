"""Keys and directions: chunked regeneration, determinism, moments, the pooled direction's span."""
import pytest
import torch

from zotune import rng
from zotune.directions import DIRECTIONS, Pooled, Position, draw, make_direction, materialize

ALL = sorted(DIRECTIONS)


@pytest.mark.parametrize("name", ALL)
def test_chunk_regenerated_alone_equals_whole_tensor_draw(name):
    direction = make_direction(name) if name != "pooled" else Pooled(pool_size=4096)
    key, tid, numel, chunk = rng.probe_seed(7, 3, 1), rng.name_id("layer.weight"), 10_000, 1024
    whole = materialize(direction, key, tid, numel, chunk)
    bounds = rng.chunk_bounds(numel, chunk)
    for c in (0, 4, len(bounds) - 1):  # first, middle, last (short) chunk
        s, e = bounds[c]
        position = Position(numel, 0, numel, s)  # positional directions (PeZO) use it
        values, sign = draw(direction, key, tid, c, position, torch.empty(e - s))
        assert torch.equal(whole[s:e], values * sign)


@pytest.mark.parametrize("name", ALL)
def test_keys_are_deterministic_and_distinct(name):
    direction = make_direction(name)
    a = materialize(direction, rng.probe_seed(0, 5, 0), 1, 5000)
    b = materialize(direction, rng.probe_seed(0, 5, 0), 1, 5000)
    c = materialize(direction, rng.probe_seed(0, 6, 0), 1, 5000)
    if getattr(direction, "positional", False):  # PeZO: numbers follow the position, not the name
        d = materialize(direction, rng.probe_seed(0, 5, 0), 1, 5000, tensor_start=777, total=10_000)
    else:
        d = materialize(direction, rng.probe_seed(0, 5, 0), 2, 5000)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("name", ALL)
def test_second_moment_matches_declaration(name):
    """Mean and second moment over 2**20 samples: standard errors are about 1e-3 (kurtosis <= 3)."""
    direction = make_direction(name)
    z = torch.cat([materialize(direction, rng.probe_seed(1, s, 0), 3, 1 << 16) for s in range(16)])
    assert abs(float(z.mean())) < 5e-3
    assert abs(float((z * z).mean()) - direction.second_moment) < 1e-2


def test_no_global_rng_is_touched():
    before = torch.random.get_rng_state()
    for name in ALL:
        materialize(make_direction(name), 123, 4, 3000)
    assert torch.equal(before, torch.random.get_rng_state())


def test_pooled_directions_span_more_than_the_pool():
    """PeZO's cyclic pool confines training to an N-dimensional subspace; ours must not."""
    pool = Pooled(pool_size=64)
    dirs = torch.stack([materialize(pool, rng.probe_seed(0, s, 0), 9, 256, chunk_size=1 << 20)
                        for s in range(400)])
    assert torch.linalg.matrix_rank(dirs.double()) == 256


def test_pooled_chunk_is_a_view_with_no_new_numbers():
    pool = Pooled(pool_size=1 << 12)
    values, sign = pool.chunk(11, torch.empty(1000))
    assert values.untyped_storage().data_ptr() == pool._pool(torch.float32, torch.device("cpu")).untyped_storage().data_ptr()
    assert sign in (1.0, -1.0) and pool.numbers_per_element == 0


def test_unknown_direction_lists_choices():
    with pytest.raises(ValueError, match="gaussian.*pooled.*rademacher.*uniform"):
        make_direction("sobol")
