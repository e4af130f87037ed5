"""Block-wise mask generator: the official generator's draws under the same seed, and its statistics."""

import random

import numpy as np
from dinov2.data.masking import MaskingGenerator as OfficialGenerator

from dinoforge.data.masking import MaskingGenerator


def test_same_masks_as_official_under_same_seed():
    for size, max_patches in (((16, 16), 128), ((4, 4), 8), ((6, 10), 30)):
        ours, ref = (
            MaskingGenerator(size, max_num_patches=max_patches),
            OfficialGenerator(size, max_num_patches=max_patches),
        )
        n = size[0] * size[1]
        for seed in range(20):
            target = int(n * (seed % 6) / 10)
            random.seed(seed)
            a = ours(target)
            random.seed(seed)
            b = ref(target)
            assert a.dtype == b.dtype == np.bool_ and a.shape == size
            np.testing.assert_array_equal(a, b)


def test_masked_fraction_statistics():
    gen = MaskingGenerator(14, max_num_patches=0.5 * 14 * 14, rng=random.Random(0))
    for ratio in (0.1, 0.3, 0.5):
        target = int(196 * ratio)
        counts = np.array([gen(target).sum() for _ in range(300)])
        assert counts.max() <= target  # never over budget
        assert counts.mean() >= 0.9 * target  # and close to it on average
    assert gen(0).sum() == 0


def test_a_single_block_is_a_rectangle_with_bounded_aspect():
    gen = MaskingGenerator(20, min_num_patches=16, max_num_patches=400, rng=random.Random(1))
    aspects = []
    for _ in range(200):
        mask = np.zeros((20, 20), dtype=bool)
        assert gen._add_block(mask, 40) > 0  # one block on an empty grid
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert mask.sum() == h * w  # the mask fills its bounding box
        aspects.append(h / w)
    assert 0.3 / 1.5 <= min(aspects) and max(aspects) <= 1.5 / 0.3  # rounding of h, w loosens [0.3, 3.33]
    assert min(aspects) < 1 < max(aspects)  # both orientations occur


def test_private_rng_leaves_global_random_alone():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    MaskingGenerator(8, max_num_patches=32, rng=random.Random(3))(20)
    assert random.random() == expected
