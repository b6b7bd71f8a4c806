"""Real data from the offline mirror, label corruption, subsets, the resolution order."""
import pytest
import torch

from lipexp import data as D


@pytest.fixture(scope="module")
def mnist(mirror, data_root):
    return D.load_dataset("mnist", "train", root=data_root, mirror=mirror, download=False), D.load_dataset(
        "mnist", "test", root=data_root, mirror=mirror, download=False)


@pytest.fixture(scope="module")
def cifar(mirror, data_root):
    return D.load_dataset("cifar10", "train", root=data_root, mirror=mirror, download=False), D.load_dataset(
        "cifar10", "test", root=data_root, mirror=mirror, download=False)


def test_mnist_from_mirror(mnist):
    tr, te = mnist
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.x.dtype == torch.uint8 and tr.y.dtype == torch.int64
    assert tr.source == "mirror:mnist.npz"
    counts = torch.bincount(tr.y, minlength=10)
    assert counts.sum() == 60000 and counts.min() > 5000 and counts.max() < 7000  # MNIST: 5421..6742
    assert float(tr.x.float().mean() / 255) == pytest.approx(0.1307, abs=2e-3)


def test_cifar10_from_mirror(cifar):
    tr, te = cifar
    assert tr.x.shape == (50000, 3, 32, 32) and te.x.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(tr.y, minlength=10), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(te.y, minlength=10), torch.full((10,), 1000))
    means = tr.x.float().mean(dim=(0, 2, 3)) / 255  # the mirror is sorted by class: use all
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.02)


def test_decoded_mirror_is_cached(mirror, data_root, mnist):
    cached = list((data_root / "lipexp_cache").glob("mnist_train_*.npz"))
    assert len(cached) == 1
    again = D.load_dataset("mnist", "train", root=data_root, mirror=mirror, download=False)
    assert torch.equal(again.x[:100], mnist[0].x[:100])


def test_missing_data_error_says_both_ways(tmp_path):
    with pytest.raises(D.DataUnavailable) as err:
        D.load_dataset("cifar100", "train", root=tmp_path, mirror=tmp_path, download=False)
    msg = str(err.value)
    assert "data.download=true" in msg and "LIPEXP_DATA_MIRROR" in msg


def test_label_corruption_fraction_and_determinism(mnist):
    y = mnist[0].y
    for eps in (0.0, 0.3, 1.0):
        y2, info = D.corrupt_labels(y, eps, 10, seed=3)
        assert info["resampled_fraction"] == pytest.approx(eps, abs=0.01)
        assert info["changed_fraction"] == pytest.approx(eps * 0.9, abs=0.01)
        assert torch.equal(y2, D.corrupt_labels(y, eps, 10, seed=3)[0])
    y_full, _ = D.corrupt_labels(y, 1.0, 10, seed=0)
    assert (torch.bincount(y_full, minlength=10).float() / len(y)).sub(0.1).abs().max() < 0.01
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.corrupt_labels(y, 1.2, 10, seed=0)


def test_subset_is_deterministic_and_balanced(cifar):
    a = D.subset(cifar[0], 1000, seed=5)
    b = D.subset(cifar[0], 1000, seed=5)
    assert torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    assert torch.equal(torch.bincount(a.y, minlength=10), torch.full((10,), 100))
    assert not torch.equal(a.y, D.subset(cifar[0], 1000, seed=6).y)


def test_batches_depend_only_on_seed_and_step():
    a = D.batch_indices(1000, 64, seed=1, step=20)
    assert torch.equal(a, D.batch_indices(1000, 64, seed=1, step=20))
    assert not torch.equal(a, D.batch_indices(1000, 64, seed=2, step=20))
    epoch = torch.cat([D.batch_indices(1000, 100, seed=1, step=s) for s in range(10)])
    assert torch.equal(epoch.sort().values, torch.arange(1000))  # one epoch visits every sample once


def test_iid_batches_are_independent_draws_with_replacement():
    a = D.batch_indices(1000, 100, seed=1, step=3, sampling="iid")
    assert torch.equal(a, D.batch_indices(1000, 100, seed=1, step=3, sampling="iid"))
    assert not torch.equal(a, D.batch_indices(1000, 100, seed=1, step=4, sampling="iid"))
    assert not torch.equal(a, D.batch_indices(1000, 100, seed=2, step=3, sampling="iid"))
    # an epoch's worth of iid draws covers about 1 - 1/e of the samples (shuffle covers all of them)
    draws = torch.cat([D.batch_indices(1000, 100, seed=1, step=s, sampling="iid") for s in range(200)])
    per_epoch = [draws[i:i + 1000].unique().numel() / 1000 for i in range(0, 20000, 1000)]
    assert abs(sum(per_epoch) / len(per_epoch) - (1 - 1 / 2.718281828)) < 0.01
    with pytest.raises(ValueError, match="unknown sampling 'bogus'"):
        D.batch_indices(1000, 100, 1, 0, sampling="bogus")
