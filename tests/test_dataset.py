"""Windows, masks and splits: exact mask ratios, determinism, and no leakage."""
import numpy as np
import pytest

from dataset import (MaskConfig, WindowDataset, build_datasets, load_series, patch_mask,
                     time_splits, window_starts)


def runs(mask):
    """Lengths of the patches, reading the window as a circle (a patch may wrap its end)."""
    mask = np.roll(mask, -int(np.argmin(mask)))  # start at an unmasked step
    m = np.concatenate(([0], mask.astype(int), [0]))
    d = np.diff(m)
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


@pytest.mark.parametrize("cfg,L", [
    (MaskConfig(0.15, patch_size=16), 512),
    (MaskConfig(0.15, patch_min=8, patch_max=128), 1024),
    (MaskConfig(0.15, patch_min=8, patch_max=128), 256),
    (MaskConfig(0.3, patch_size=5), 100),
    (MaskConfig(0.5, patch_min=1, patch_max=3), 64),
    (MaskConfig(0.9, patch_size=4), 50),
])
def test_patch_mask_hits_the_ratio_exactly(cfg, L):
    target = round(cfg.ratio * L)
    for seed in range(200):
        m = patch_mask(L, cfg, np.random.default_rng(seed))
        assert m.sum() == target
        assert len(m) == L


def test_patch_sizes_respect_the_bounds():
    cfg = MaskConfig(0.15, patch_min=8, patch_max=32)
    lengths = np.concatenate([runs(patch_mask(1024, cfg, np.random.default_rng(s))) for s in range(300)])
    assert lengths.min() >= 8
    # the last draw can be spread over the others, pushing a few patches slightly past the max
    assert np.mean(lengths <= 32) > 0.95
    fixed = MaskConfig(0.25, patch_size=16)
    for s in range(100):
        m = patch_mask(256, fixed, np.random.default_rng(s))
        # 64 masked steps = 4 patches of 16 that never touch, one possibly cut by the window's end
        lengths = runs(m)
        assert np.all(lengths == 16) and len(lengths) == 4


def test_mask_positions_are_spread_over_the_window():
    cfg = MaskConfig(0.15, patch_size=8)
    freq = np.mean([patch_mask(200, cfg, np.random.default_rng(s)) for s in range(4000)], axis=0)
    assert abs(freq.mean() - 0.15) < 1e-9
    # every position is masked with probability 0.15 (a linear layout starves the edges)
    assert freq.min() > 0.12 and freq.max() < 0.18


def test_splits_are_disjoint_with_gaps_and_windows_stay_inside():
    L = 256
    sp = time_splits(20_000, L, 0.1, 0.1)
    assert sp.train[0] == 0 and sp.test[1] == 20_000
    assert sp.val[0] - sp.train[1] >= L and sp.test[0] - sp.val[1] >= L
    for block, stride, cover in ((sp.train, 32, False), (sp.val, L, True), (sp.test, L, True)):
        st = window_starts(block, L, stride, cover)
        assert st.min() >= block[0] and st.max() + L <= block[1]
        if cover:  # evaluation windows cover every step of their block
            covered = np.zeros(20_000, bool)
            for s in st:
                covered[s:s + L] = True
            assert covered[block[0]:block[1]].all()


def test_no_training_window_touches_a_scored_step(small_data_dir):
    series = load_series(small_data_dir)
    ds = build_datasets(series, seq_len=200, stride=7, mask_cfg=MaskConfig(0.15, 10), seed=0)
    train_steps = np.zeros(series.n_steps, bool)
    for s in ds["train"].starts:
        train_steps[s:s + 200] = True
    for name in ("val", "test"):
        for s in ds[name].starts:
            assert not train_steps[max(0, s - 200):s + 400].any()  # a full window of gap too


def test_masks_fixed_for_evaluation_and_fresh_per_epoch(small_data_dir):
    series = load_series(small_data_dir)
    ds = build_datasets(series, seq_len=128, stride=64, mask_cfg=MaskConfig(0.15, 8), seed=1)
    train, val = ds["train"], ds["val"]
    m0 = [train[i][2] for i in range(20)]
    v0 = [val[i][2] for i in range(5)]
    train.set_epoch(1)
    val.set_epoch(1)
    m1 = [train[i][2] for i in range(20)]
    assert any(not np.array_equal(a, b) for a, b in zip(m0, m1))
    assert all(np.array_equal(a, val[i][2]) for i, a in enumerate(v0))
    train.set_epoch(0)
    assert all(np.array_equal(a, train[i][2]) for i, a in enumerate(m0))
    again = build_datasets(series, seq_len=128, stride=64, mask_cfg=MaskConfig(0.15, 8), seed=1)
    assert all(np.array_equal(a, again["val"][i][2]) for i, a in enumerate(v0))


def test_dataloader_workers_give_the_same_masks(small_data_dir):
    import torch
    series = load_series(small_data_dir)
    ds = build_datasets(series, seq_len=128, stride=64, mask_cfg=MaskConfig(0.15, 8), seed=2)["train"]
    ds.set_epoch(3)
    direct = np.stack([ds[i][2] for i in range(16)])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = [b[2].numpy() for _, b in zip(range(2), loader)]
    np.testing.assert_array_equal(np.concatenate(batches), direct)
    x, s, m = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (8, 128, 20) and s.dtype == torch.int64


def test_item_is_the_right_slice(small_data_dir):
    series = load_series(small_data_dir)
    ds = WindowDataset(series.X, series.states, np.array([5, 1000]), 64, None)
    x, s, m = ds[1]
    np.testing.assert_array_equal(x, series.X[1000:1064])
    np.testing.assert_array_equal(s, series.states[1000:1064])
    assert not m.any()


def test_clear_errors(tmp_path, small_data_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_series(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="markov_circles_timeseries.py"):
        load_series(str(tmp_path))
    (tmp_path / "data.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_series(str(tmp_path))
    np.savez(tmp_path / "data.npz", Y=np.zeros(3))
    with pytest.raises(ValueError, match="lacks the arrays"):
        load_series(str(tmp_path))
    series = load_series(small_data_dir)
    with pytest.raises(ValueError, match="longer than the series"):
        build_datasets(series, seq_len=50_000, stride=1, mask_cfg=None, seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        build_datasets(series, seq_len=3000, stride=1, mask_cfg=None, seed=0)
    with pytest.raises(ValueError, match="both"):
        MaskConfig(0.15, patch_min=8)
    with pytest.raises(ValueError, match="ratio"):
        MaskConfig(1.5)
