import numpy as np
import pytest
import torch

from cnnlab.data import Batches, BatchPrep, Preprocess, cache_key, load_images, scan_folder, stratified_split
from cnnlab.decode import load_rgb
from cnnlab.errors import DataError
from conftest import write_bad_files


def test_bad_files_are_reported_never_fatal(tmp_path, cache_dir):
    expected = write_bad_files(tmp_path / "train" / "odd")
    write_bad_files(tmp_path / "train" / "odd2")
    images = load_images(tmp_path / "train", 32, cache_dir, workers=2, progress=False)
    names = [p.name for p in images.files]
    bad = {names[i] for i in images.errors}
    assert bad == {n for n, ok in expected.items() if not ok}
    assert len(images.errors) == 2 * len(bad)
    report = images.bad_file_report()
    assert "truncated.jpg" in report and "notes.txt" in report and report.count("\n") == len(images.errors)
    assert images.pixels.shape == (len(names), 32, 32, 3)
    alpha = names.index("alpha.png")  # fully transparent: composited on white
    assert images.pixels[alpha].min() == 255
    huge = names.index("huge.jpg")
    assert abs(int(images.pixels[huge][..., 0].mean()) - 200) < 3
    for i in images.valid:
        assert images.pixels[i].any()


def test_cache_is_reused_and_keyed_by_content(tiny_data, cache_dir):
    a = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    npys = sorted(cache_dir.glob("*.npy"))
    assert len(npys) == 1
    mtime = npys[0].stat().st_mtime_ns
    b = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    assert npys[0].stat().st_mtime_ns == mtime and np.array_equal(a.pixels, b.pixels)
    load_images(tiny_data / "train", 48, cache_dir, workers=1, progress=False)  # another size: another entry
    assert len(list(cache_dir.glob("*.npy"))) == 2
    classes, files, _ = scan_folder(tiny_data / "train")
    key = cache_key(files, 32)
    files[0].touch()
    import os
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    assert cache_key(files, 32) != key


def test_a_damaged_cache_file_is_rebuilt(tiny_data, cache_dir):
    a = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    npy = next(cache_dir.glob("*.npy"))
    expected = np.array(a.pixels)
    del a
    npy.write_bytes(npy.read_bytes()[:1000])  # cut short, as a full disk would leave it
    b = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    assert np.array_equal(np.asarray(b.pixels), expected)


def test_parallel_and_serial_decode_agree(tiny_data, tmp_path):
    a = load_images(tiny_data / "train", 40, tmp_path / "c1", workers=1, progress=False)
    b = load_images(tiny_data / "train", 40, tmp_path / "c2", workers=2, progress=False)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.pixels[0], load_rgb(str(a.files[0]), 40))


def test_missing_folder_is_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(DataError, match="cnnlab demo-data"):
        load_images(tmp_path / "nothing", 32, cache_dir)


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(5), [10, 20, 30, 7, 2])
    rows = np.arange(len(labels))
    t1, v1 = stratified_split(labels, rows, 0.2, seed=3)
    t2, v2 = stratified_split(labels, rows, 0.2, seed=3)
    t3, v3 = stratified_split(labels, rows, 0.2, seed=4)
    assert np.array_equal(v1, v2) and not np.array_equal(v1, v3)
    assert not set(t1) & set(v1) and len(t1) + len(v1) == len(labels)
    assert np.bincount(labels[v1]).tolist() == [2, 4, 6, 1, 1]  # round(n*0.2), at least one per class
    # not the first 20% of each class
    assert not np.array_equal(v1[:2], np.array([0, 1]))


def test_split_skips_unreadable_rows():
    labels = np.zeros(10, dtype=np.int64)
    valid = np.array([0, 2, 4, 6, 8])
    t, v = stratified_split(labels, valid, 0.4, 0)
    assert set(t) | set(v) == set(valid.tolist())


def test_batches_cover_every_row_once_in_channels_last(tiny_data, cache_dir):
    images = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    rows = images.valid[::2]
    batches = Batches(images, rows, 7, torch.device("cpu"), shuffle=True)
    seen = []
    for x, y in batches.epoch(seed=5):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last)
        seen.append(y)
    assert sum(len(y) for y in seen) == len(rows)
    assert sorted(torch.cat(seen).tolist()) == sorted(images.labels[rows].tolist())
    ordered = Batches(images, rows, 7, torch.device("cpu"), shuffle=False)
    pixels = torch.cat([x.permute(0, 2, 3, 1).clone() for x, _ in ordered.epoch(0)])  # read with pread
    assert torch.equal(pixels, torch.from_numpy(np.asarray(images.pixels[rows])))
    first = [y.tolist() for _, y in batches.epoch(5)]
    assert first == [y.tolist() for _, y in batches.epoch(5)] and first != [y.tolist() for _, y in batches.epoch(6)]


def _batch(b=6, s=32):
    return torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels_last view


def _normalised(x):
    pre = Preprocess(x.shape[-1])
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_prep_without_augmentation_is_exact_normalisation():
    x = _batch()
    out = BatchPrep(Preprocess(32))(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, _normalised(x), atol=1e-5)
    assert BatchPrep(Preprocess(32), channels_last=False)(x).is_contiguous()


def test_augmentation_is_seeded_and_varied():
    x = _batch()
    prep = BatchPrep(Preprocess(32))
    a = prep(x, torch.Generator().manual_seed(0)).clone()
    b = prep(x, torch.Generator().manual_seed(0)).clone()
    c = prep(x, torch.Generator().manual_seed(1)).clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 32, 32) and torch.isfinite(a).all()


def test_full_crops_without_jitter_are_the_image_or_its_mirror():
    x = _batch(8)
    out = BatchPrep(Preprocess(32), scale=(1, 1), ratio=(1, 1), jitter=0)(x, torch.Generator().manual_seed(0))
    ref = _normalised(x)
    flips = 0
    for i in range(8):
        same, mirrored = torch.allclose(out[i], ref[i], atol=1e-5), torch.allclose(out[i], ref[i].flip(-1), atol=1e-5)
        assert same or mirrored
        flips += mirrored
    assert 0 < flips < 8


def test_crops_zoom_into_the_image():
    x = torch.zeros(4, 64, 64, 3, dtype=torch.uint8)
    x[:, 16:48, 16:48] = 255  # a white square in the middle
    out = BatchPrep(Preprocess(64), scale=(0.25, 0.25), ratio=(1, 1), jitter=0)(x.permute(0, 3, 1, 2),
                                                                                 torch.Generator().manual_seed(3))
    white = (out[:, 0] > 0).float().mean(dim=(1, 2))
    assert (white > 0.25).all()  # the square covers a quarter of the image, more of a quarter-area crop
