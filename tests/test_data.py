import numpy as np
import pytest
import torch
from conftest import write_bad_files
from PIL import Image

from cnnlab.data import Batches, DeviceCache, ImageTransform, cache_key, load_images, scan_folder, stratified_split
from cnnlab.data.decode import load_rgb
from cnnlab.errors import DataError
from cnnlab.preprocess import Preprocess


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


def test_batched_tensor_decoder_agrees_with_pil_and_reports_the_same_files(tmp_path, cache_dir):
    """The nvJPEG build path (decode_gpu) run on CPU, torchvision's libjpeg-turbo standing in for nvJPEG:
    the same files are refused, PNG/GIF/CMYK fall back to PIL, and pixels agree with the PIL path to within
    what two antialiased resizes differ by. Batches of 4 put bad files beside good ones in one batch."""
    from cnnlab.data.decode_gpu import decode_into

    expected = write_bad_files(tmp_path / "train" / "odd")
    rng = np.random.default_rng(3)
    for i in range(6):  # smooth photo-like JPEGs of several sizes
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320 + 40 * i, 240 + 30 * i), Image.BICUBIC).save(tmp_path / "train" / "odd" / f"p{i}.jpg", quality=92)
    pil = load_images(tmp_path / "train", 48, cache_dir, workers=1, progress=False)
    tv = load_images(tmp_path / "train", 48, cache_dir, progress=False, decode_device=torch.device("cpu"))
    assert len(list(cache_dir.glob("*.npy"))) == 2  # each decoder has its own cache entry
    assert tv.errors.keys() == pil.errors.keys()
    names = [p.name for p in tv.files]
    assert {names[i] for i in tv.errors} == {n for n, ok in expected.items() if not ok}
    diff = np.abs(tv.pixels[tv.valid].astype(int) - pil.pixels[pil.valid].astype(int))
    assert diff.mean() < 1.5, diff.mean()
    for i in tv.errors:
        assert not tv.pixels[i].any()
    out = np.zeros((len(tv.files), 48, 48, 3), np.uint8)  # batch size independent
    errors = decode_into(tv.files, (48, 0.0, "bilinear"), out, torch.device("cpu"), batch=4)
    assert errors == tv.errors and np.array_equal(out, tv.pixels)


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


def test_device_resident_batches_equal_streamed_ones_and_share_one_upload(tiny_data, cache_dir):
    """The GPU path (whole cache uploaded once, batches drawn by index there) forced on CPU."""
    images = load_images(tiny_data / "train", 32, cache_dir, workers=1, progress=False)
    train, val = images.valid[::2], images.valid[1::2]
    cpu = torch.device("cpu")
    streamed = [(x.clone(), y) for x, y in Batches(images, train, 8, cpu, shuffle=True).epoch(seed=3)]
    shared = DeviceCache()  # owned by the caller: a run, or a sweep process for all its trials
    resident_train = Batches(images, train, 8, cpu, shuffle=True, resident=True, device_cache=shared)
    resident_val = Batches(images, val, 8, cpu, shuffle=False, resident=True, device_cache=shared)
    assert resident_train.resident is resident_val.resident  # one upload for both (and for the next trial)
    other = Batches(images, val, 8, cpu, shuffle=False, resident=True, device_cache=DeviceCache())
    assert other.resident is not resident_val.resident  # no hidden process-wide cache
    assert resident_train.resident.shape[0] == len(images.files)
    for (a, ya), (b, yb) in zip(streamed, resident_train.epoch(seed=3), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    x, y = next(iter(resident_val))
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(np.asarray(images.pixels[val[:8]])))
    assert torch.equal(y, torch.from_numpy(images.labels[val[:8]]))


def test_prep_without_augmentation_is_exact_normalisation():
    x = _batch()
    out = ImageTransform(Preprocess(32))(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, _normalised(x), atol=1e-5)
    assert ImageTransform(Preprocess(32), channels_last=False)(x).is_contiguous()


def test_augmentation_is_seeded_and_varied():
    x = _batch()
    prep = ImageTransform(Preprocess(32))
    a = prep(x, torch.Generator().manual_seed(0)).clone()
    b = prep(x, torch.Generator().manual_seed(0)).clone()
    c = prep(x, torch.Generator().manual_seed(1)).clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 32, 32) and torch.isfinite(a).all()


def test_full_crops_without_jitter_are_the_image_or_its_mirror():
    x = _batch(8)
    out = ImageTransform(Preprocess(32), scale=(1, 1), ratio=(1, 1), jitter=0)(x, torch.Generator().manual_seed(0))
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
    out = ImageTransform(Preprocess(64), scale=(0.25, 0.25), ratio=(1, 1), jitter=0)(x.permute(0, 3, 1, 2),
                                                                                 torch.Generator().manual_seed(3))
    white = (out[:, 0] > 0).float().mean(dim=(1, 2))
    assert (white > 0.25).all()  # the square covers a quarter of the image, more of a quarter-area crop
