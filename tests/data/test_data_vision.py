"""CIFAR-N builders (synthetic raw files, the shared prepared subset) and preprocessing."""
import pickle
import time

import numpy as np
import pytest
import torch

from lai.data import MissingDataError, build_data
from lai.data.noise import symmetric_noise
from lai.data.vision import CIFAR10, CifarPreprocess, random_crop_flip

CIFAR10N_NAMES = ["cifar10n_aggre", "cifar10n_random1", "cifar10n_worst"]


def _images(index: np.ndarray, rng) -> np.ndarray:
    """Random CIFAR rows [n, 3072] whose first two bytes encode the image's index."""
    data = rng.integers(0, 256, (len(index), 3072), dtype=np.uint8)
    data[:, 0], data[:, 1] = index % 256, index // 256
    return data


def _index_of(x: torch.Tensor) -> np.ndarray:
    """Decode the index written by _images from uint8 [N, 3, 32, 32] images."""
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).numpy()


def write_raw_cifar(root, classes=10, n_train=200, n_test=40, seed=0):
    """torchvision-layout pickles plus a CIFAR-N release file; returns the label arrays."""
    rng = np.random.default_rng(seed)
    clean = np.tile(np.arange(classes), n_train // classes)
    test_y = rng.integers(0, classes, n_test)
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)]
        folder, key = root / "cifar-10-batches-py", b"labels"
    else:
        folder, names, key = root / "cifar-100-python", ["train"], b"fine_labels"
    folder.mkdir(parents=True)
    for part, rows in zip(names, np.array_split(np.arange(n_train), len(names)), strict=True):
        with open(folder / part, "wb") as f:
            pickle.dump({b"data": _images(rows, rng), key: clean[rows].tolist()}, f)
    with open(folder / ("test_batch" if classes == 10 else "test"), "wb") as f:
        pickle.dump({b"data": _images(np.arange(n_test), rng), key: test_y.tolist()}, f)
    labels = {"clean_label": clean}
    if classes == 10:
        for k, (rate, s) in {"worse_label": (0.4, 1), "aggre_label": (0.1, 2),
                             "random_label1": (0.2, 3)}.items():
            labels[k] = symmetric_noise(clean, rate, classes, seed=s)[0]
        torch.save(labels, root / "CIFAR-10_human.pt")
    else:
        labels["noisy_label"] = symmetric_noise(clean, 0.4, classes, seed=4)[0]
        (root / "cifar100n").mkdir()
        torch.save(labels, root / "cifar100n" / "CIFAR-100_human.pt")
    return labels, test_y


def test_raw_cifar10_with_release_labels(tmp_path, make_cfg):
    labels, test_y = write_raw_cifar(tmp_path)
    cfg = make_cfg("cifar10n_worst", train_limit=None, val_limit=None, test_limit=None)
    b = build_data(cfg, data_dir=tmp_path, seed=0)
    assert b.info["source"] == "raw" and b.num_classes == 10
    assert b.train.inputs.dtype == torch.uint8 and b.train.inputs.shape[1:] == (3, 32, 32)
    tr, va, te = _index_of(b.train.inputs), _index_of(b.val.inputs), _index_of(b.test.inputs)
    assert len(va) == 20 and len(tr) == 180 and len(te) == 40
    assert not set(tr) & set(va)
    np.testing.assert_array_equal(b.train.labels.numpy(), labels["worse_label"][tr])
    np.testing.assert_array_equal(b.val.labels.numpy(), labels["clean_label"][va])  # clean val
    np.testing.assert_array_equal(b.test.labels.numpy(), test_y[te])
    np.testing.assert_array_equal(b.noisy, labels["worse_label"][tr] != labels["clean_label"][tr])
    np.testing.assert_array_equal(b.clean_train_labels, labels["clean_label"][tr])


def test_paper_code_noise(tmp_path, make_cfg):
    labels, _ = write_raw_cifar(tmp_path)
    paper = symmetric_noise(labels["clean_label"], 0.5, 10, seed=9)[0]
    (tmp_path / "cifar10n").mkdir()
    np.savez(tmp_path / "cifar10n" / "paper_code_worst_labels.npz",
             train_index=np.arange(200), label=paper)
    cfg = make_cfg("cifar10n_worst", noise="paper_code", train_limit=None)
    b = build_data(cfg, data_dir=tmp_path, seed=0)
    np.testing.assert_array_equal(b.train.labels.numpy(), paper[_index_of(b.train.inputs)])
    assert "exact" in b.info["noise_source"]
    # other variants resample from the transition matrix: seeded, not the human labels
    cfg = make_cfg("cifar10n_random1", noise="paper_code", train_limit=None)
    r1 = build_data(cfg, data_dir=tmp_path, seed=0)
    r2 = build_data(cfg, data_dir=tmp_path, seed=0)
    np.testing.assert_array_equal(r1.train.labels, r2.train.labels)
    assert "transition" in r1.info["noise_source"]
    with pytest.raises(ValueError, match="noise"):
        build_data(make_cfg("cifar10n_worst", noise="bogus"), data_dir=tmp_path, seed=0)


def test_raw_cifar100n(tmp_path, make_cfg, check_classification):
    labels, _ = write_raw_cifar(tmp_path, classes=100, n_train=400, n_test=30)
    b = build_data(make_cfg("cifar100n", train_limit=None, val_limit=None), data_dir=tmp_path,
                   seed=1)
    assert b.num_classes == 100 and len(b.train) + len(b.val) == 400
    va = _index_of(b.val.inputs)
    np.testing.assert_array_equal(b.val.labels.numpy(), labels["clean_label"][va])
    check_classification(b, make_cfg("cifar100n", train_limit=400, val_limit=400))


def test_cifar_refuses_val_source_split(tmp_path, make_cfg):
    with pytest.raises(ValueError, match="holdout"):
        build_data(make_cfg("cifar10n_worst", val_source="split"), data_dir=tmp_path, seed=0)


def test_missing_cifar10_names_every_file(tmp_path, make_cfg):
    with pytest.raises(MissingDataError) as e:
        build_data(make_cfg("cifar10n_aggre"), data_dir=tmp_path, seed=0)
    msg = str(e.value)
    for part in ("cifar10n_first10k.npz", "cifar10n_labels_full.npz", "cifar-10-batches-py",
                 "data_batch_1", "test_batch", "CIFAR-10_human.pt", "data_dir=", "LAI_DATA"):
        assert part in msg


# ----------------------------------------------------------------------------- shared data

@pytest.mark.parametrize("name", CIFAR10N_NAMES)
def test_shared_cifar10n_builds(shared_data, name, make_cfg, check_classification):
    cfg = make_cfg(name)
    b = build_data(cfg, data_dir=shared_data, seed=0)
    check_classification(b, cfg)
    batch = b.train.collate(list(range(8)))
    assert batch.inputs.shape == (8, 3, 32, 32) and batch.inputs.dtype == torch.uint8
    assert b.info["source"] == "prepared"
    if any("first10k" in f for f in b.info["files"]):  # the shared subset
        assert b.info["pool_size"] == 10000
    expected = {"cifar10n_aggre": 0.09, "cifar10n_random1": 0.18, "cifar10n_worst": 0.41}[name]
    assert b.info["noise_rate_pool"] == pytest.approx(expected, abs=0.01)
    x = b.preprocess(batch.inputs, True)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_shared_cifar10n_worst_paper_code(shared_data, make_cfg):
    b = build_data(make_cfg("cifar10n_worst", noise="paper_code"), data_dir=shared_data, seed=0)
    assert "exact" in b.info["noise_source"]
    assert b.info["noise_rate_pool"] == pytest.approx(0.405, abs=0.02)  # README: 59.5% agree


def test_shared_cifar100n_is_missing_images(shared_data, make_cfg):
    if ((shared_data / "cifar-100-python").exists()
            or (shared_data / "cifar100n" / "cifar100n.npz").exists()):
        pytest.skip("this data folder has CIFAR-100 images")
    with pytest.raises(MissingDataError) as e:
        build_data(make_cfg("cifar100n"), data_dir=shared_data, seed=0)
    msg = str(e.value)
    for part in ("cifar100n/cifar100n.npz", "cifar-100-python", "CIFAR-100_human.pt",
                 "images are missing", "download=false", "LAI_DATA"):
        assert part in msg


def test_shared_cifar100n_download_fails_fast_offline(shared_data, offline, make_cfg):
    if (shared_data / "cifar-100-python").exists():
        pytest.skip("this data folder has CIFAR-100 images")
    start = time.monotonic()
    with pytest.raises(MissingDataError, match="Download attempted and failed"):
        build_data(make_cfg("cifar100n", download=True), data_dir=shared_data, seed=0)
    assert time.monotonic() - start < 10


# ----------------------------------------------------------------------------- preprocessing

def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_preprocess_eval_normalises():
    x = _batch()
    pre = CifarPreprocess(CIFAR10.mean, CIFAR10.std, augment=True)
    out = pre(x, False)
    assert out.shape == x.shape and out.dtype == torch.float32
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    lo, hi = ((0 - mean) / std).min(), ((1 - mean) / std).max()
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    no_aug = CifarPreprocess(CIFAR10.mean, CIFAR10.std, augment=False)
    torch.testing.assert_close(no_aug(x, True), out)  # augment=False: train == eval


def test_augmentation_is_random_and_a_true_crop_or_flip():
    torch.manual_seed(0)
    x = _batch(16).float()
    a, b = random_crop_flip(x), random_crop_flip(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not torch.equal(a, b)  # random
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # each output is one of the 9 x 9 x 2 crops of its own image
        crops = [c for dy in range(9) for dx in range(9)
                 for c in (padded[i, :, dy:dy + 32, dx:dx + 32],
                           padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1))]
        assert any(torch.equal(a[i], c) for c in crops)
    # zero padding shows up as zeros, not as wrapped pixels
    ones = random_crop_flip(torch.ones(64, 3, 32, 32))
    assert (ones == 0).any() and set(ones.unique().tolist()) <= {0.0, 1.0}


def test_download_fallback_then_raw(tmp_path, make_cfg, monkeypatch):
    calls = []

    def fake_download(root, fam):
        calls.append(fam.classes)
        write_raw_cifar(root)

    monkeypatch.setattr("lai.data.vision._download", fake_download)
    b = build_data(make_cfg("cifar10n_aggre", download=True), data_dir=tmp_path, seed=0)
    assert calls == [10] and b.info["source"] == "download"
    with pytest.raises(MissingDataError):  # download=false never calls it
        build_data(make_cfg("cifar100n"), data_dir=tmp_path, seed=0)
    assert calls == [10]


def test_prepared_cifar100n_with_separate_label_table(tmp_path, make_cfg):
    rng = np.random.default_rng(0)
    n = 300
    x = _images(np.arange(n), rng).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC
    folder = tmp_path / "cifar100n"
    folder.mkdir()
    np.savez(folder / "cifar100n.npz", train_x=x, test_x=x[:20], test_y=np.arange(20))
    clean = np.arange(1000) % 100  # the table covers more images than the prepared file
    noisy = symmetric_noise(clean, 0.4, 100, seed=0)[0]
    np.savez(folder / "cifar100n_labels.npz", train_index=np.arange(1000)[::-1].copy(),
             clean_label=clean[::-1].copy(), noisy_label=noisy[::-1].copy())
    b = build_data(make_cfg("cifar100n", train_limit=None, val_limit=None), data_dir=tmp_path,
                   seed=0)
    assert b.info["source"] == "prepared" and b.info["pool_size"] == n
    tr, va = _index_of(b.train.inputs), _index_of(b.val.inputs)
    np.testing.assert_array_equal(b.train.labels.numpy(), noisy[tr])  # aligned by train_index
    np.testing.assert_array_equal(b.val.labels.numpy(), clean[va])
