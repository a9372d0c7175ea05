"""MNIST-format readers: IDX (gz or not), npz, and clear errors."""
import gzip
import struct

import numpy as np
import pytest

from trainer.data import DataError, load_mnist_format, read_idx


def write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 255, (6, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (6,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 255, (4, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (4,)),
    }
    for name, a in arrays.items():
        write_idx(tmp_path / (name + (".gz" if gz else "")), a, gz)
    (x_train, y_train, x_test, y_test), where = load_mnist_format("mnist", str(tmp_path))
    assert where == str(tmp_path)
    np.testing.assert_array_equal(x_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


def test_npz(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.arange(3), x_test=np.ones((2, 28, 28), np.uint8),
             y_test=np.arange(2))
    (x_train, _, x_test, _), _ = load_mnist_format("mnist", str(path))
    assert x_train.shape == (3, 28, 28) and x_test.sum() == 2 * 28 * 28


def test_truncated_idx_is_an_error(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, np.zeros((5, 28, 28)), gz=False)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_bad_path_and_name_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        load_mnist_format("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.name"):
        load_mnist_format("cifar", None)


def test_real_fashion_mnist_is_available_offline():
    (x_train, y_train, x_test, y_test), where = load_mnist_format("fashion_mnist")
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert set(np.unique(y_train)) == set(range(10))


def test_each_worker_shuffles_its_shard_with_its_own_seed():
    """Two input pipelines (two workers): worker 0 keeps the run's order of its shard, worker 1's is permuted
    by another seed, so a global batch is not file-order neighbours (2k and 2k+1) as with one seed for all."""
    import tensorflow as tf

    from trainer.data import classification_pipeline, pipeline_seed

    x = np.arange(64, dtype=np.float32)[:, None]
    make = classification_pipeline(x, np.arange(64) % 2, global_batch_size=8, seed=7, training=True)
    firsts = []
    for worker in (0, 1):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        firsts.append(next(iter(make(ctx)))[0].numpy()[:, 0].astype(int))
    assert all(v % 2 == w for w, first in enumerate(firsts) for v in first)  # each its own shard
    assert [v // 2 for v in firsts[0]] != [v // 2 for v in firsts[1]]  # not neighbours, pair by pair
    assert pipeline_seed(7, None) == 7 and pipeline_seed(7, ctx) != 7
