"""SSL batch collation vs the official collate_data_and_cast under the same seed, plus its invariants."""

import random

import pytest
import torch
from dinov2.data.collate import collate_data_and_cast as official_collate
from dinov2.data.masking import MaskingGenerator as OfficialGenerator

from dinoforge.data.collate import collate_data_and_cast
from dinoforge.data.masking import MaskingGenerator
from dinoforge.utils import DinoforgeError


def _samples(b: int, n_local: int = 3) -> list:
    out = []
    for i in range(b):
        crops = {
            "global_crops": [torch.full((3, 32, 32), float(10 * i + g)) for g in range(2)],
            "local_crops": [torch.full((3, 16, 16), float(10 * i + 5 + j)) for j in range(n_local)],
        }
        out.append((crops, i))
    return out


def test_matches_official_under_same_seed():
    samples = _samples(6)
    random.seed(0)
    ref = official_collate(samples, (0.1, 0.5), 0.5, torch.float16, 64, OfficialGenerator(8, max_num_patches=32))
    random.seed(0)
    ours = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, 64, MaskingGenerator(8, max_num_patches=32))
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
        else:
            assert ours[key] == value, key


def test_layout_masks_and_weights():
    random.seed(1)
    out = collate_data_and_cast(_samples(8), (0.1, 0.5), 0.5, torch.float32, mask_generator=MaskingGenerator(8))
    g, loc, masks = out["collated_global_crops"], out["collated_local_crops"], out["collated_masks"]
    assert g.shape == (16, 3, 32, 32) and loc.shape == (24, 3, 16, 16) and masks.shape == (16, 64)
    assert g[:8, 0, 0, 0].tolist() == [10.0 * i for i in range(8)]  # crop-major: first global crop of every image
    assert g[8:, 0, 0, 0].tolist() == [10.0 * i + 1 for i in range(8)]
    counts = masks.sum(1)
    assert (counts > 0).sum() == 8  # half of the global crops are masked
    # stratified ratios: the k-th smallest masked count is at most the k-th stratum's upper bound
    strata_hi = [int(64 * (0.1 + 0.05 * (k + 1))) for k in range(8)]
    assert all(c <= hi for c, hi in zip(sorted(counts[counts > 0].tolist()), strata_hi, strict=True))
    assert out["upperbound"] == sum(strata_hi)
    assert out["n_masked_patches"].tolist() == [int(counts.sum())]
    torch.testing.assert_close(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    # every masked crop's weights sum to 1, so each image counts equally in the iBOT loss
    crop_of_token = out["mask_indices_list"] // 64
    per_crop = torch.zeros(16).index_add_(0, crop_of_token, out["masks_weight"])
    torch.testing.assert_close(per_crop, (counts > 0).float())


def test_none_samples_are_dropped():
    samples = _samples(4)
    samples[1] = None
    random.seed(2)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, mask_generator=MaskingGenerator(8))
    assert out["collated_global_crops"].shape[0] == 6
    assert out["collated_global_crops"][:3, 0, 0, 0].tolist() == [0.0, 20.0, 30.0]
    with pytest.raises(DinoforgeError):
        collate_data_and_cast([None, None], (0.1, 0.5), 0.5, torch.float32, mask_generator=MaskingGenerator(8))


def test_no_local_crops():
    out = collate_data_and_cast(_samples(2, n_local=0), (0.1, 0.5), 0.5, torch.float32, 64, MaskingGenerator(8))
    assert out["collated_local_crops"].shape == (0, 3, 32, 32)
