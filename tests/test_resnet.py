"""The ResNet recipe: image sources on small real samples, models and weights, fine-tuning, precision, CLI.

Real images come from Fashion-MNIST (on this machine offline); the image-folder and TFRecord tests write
a few of them to disk in the formats those sources read.
"""
import importlib.util
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_metrics, run_cli
from trainer import Callback, Trainer
from trainer.data import DataError, load_mnist_format
from trainer.recipes import images, resnet
from trainer.recipes._image_pipeline import ImageTransform, preprocess


@pytest.fixture(scope="module")
def fashion():
    (x_train, y_train, x_test, y_test), _ = load_mnist_format("fashion_mnist")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


@pytest.fixture(autouse=True)
def float32_policy():
    """Trainer sets Keras' global dtype policy; put it back for the other tests."""
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def batches(dataset_fn, n, ctx=None):
    return [(x.numpy(), y.numpy()) for x, y in dataset_fn(ctx).take(n)]


def all_batches(dataset_fn, ctx=None):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset_fn(ctx)])
    return np.concatenate(xs), np.concatenate(ys)


def resized(grey28, size):
    """What the pipeline should produce for an un-augmented image: RGB, bilinear-resized, float."""
    rgb = np.repeat(grey28[..., None], 3, axis=-1)
    return tf.image.resize(rgb, [size, size]).numpy()


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------


def test_preprocessing_matches_keras_applications():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    from keras.applications import imagenet_utils, resnet as keras_resnet, resnet_v2

    expected = {
        "caffe": keras_resnet.preprocess_input(pixels.copy()),
        "tf": resnet_v2.preprocess_input(pixels.copy()),
        "torch": imagenet_utils.preprocess_input(pixels.copy(), mode="torch"),
    }
    for mode, want in expected.items():
        np.testing.assert_allclose(preprocess(tf.constant(pixels), mode).numpy(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="data.preprocessing"):
        preprocess(tf.constant(pixels), "bgr")


def test_fashion_mnist_subset_labels_images_and_determinism(fashion):
    _, _, x_test, y_test = fashion
    bundle = images.fashion_mnist(
        image_size=16, batch_size=32, classes=[5, 7, 9], num_classes=3, train_limit=300, seed=1, preprocessing="none"
    )
    assert "Fashion-MNIST (real images)" in bundle.description and "Sandal, Sneaker, Ankle boot" in bundle.description
    assert bundle.train_examples == 300

    # Eval: every test image of those classes, in order, relabelled 0..2, resized, not augmented.
    x_eval, y_eval = all_batches(bundle.eval)
    keep = np.isin(y_test, [5, 7, 9])
    np.testing.assert_array_equal(y_eval, np.searchsorted([5, 7, 9], y_test[keep]))
    want = np.round(resized(x_test[keep][:64], 16))  # the source stores the resized images as uint8
    np.testing.assert_allclose(x_eval[:64], want, atol=1.0)

    # Train: per-replica batches of augmented RGB images; the same stream every time for one seed.
    first = batches(bundle.train, 3)
    assert first[0][0].shape == (32, 16, 16, 3) and first[0][0].dtype == np.float32
    assert set(np.concatenate([y for _, y in first])) <= {0, 1, 2}
    again = batches(bundle.train, 3)
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Resuming skips batches: the skipped stream continues exactly where the full one is, also when the
    # pipeline skips the records itself, before decoding (what the Trainer asks of it: skips_itself).
    np.testing.assert_array_equal(next(iter(bundle.train(None).skip(2)))[0].numpy(), first[2][0])
    assert bundle.train.skips_itself
    np.testing.assert_array_equal(next(iter(bundle.train(None, skip_steps=2)))[0].numpy(), first[2][0])
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    per_replica = batches(bundle.train, 6, ctx)  # 2 replicas per pipeline: a step takes 2 batches
    np.testing.assert_array_equal(next(iter(bundle.train(ctx, skip_steps=2)))[0].numpy(), per_replica[4][0])
    other_seed = images.fashion_mnist(image_size=16, batch_size=32, classes=[5, 7, 9], num_classes=3, train_limit=300,
                                      seed=2)
    assert not np.array_equal(batches(other_seed.train, 1)[0][1], first[0][1])

    with pytest.raises(DataError, match="data.num_classes=3"):
        images.fashion_mnist(image_size=16, classes=[5, 7, 9], num_classes=10)


def test_a_resumed_image_stream_trains_as_the_uninterrupted_one(tmp_path):
    """The Trainer resumes an image pipeline through its own record-level skip (before decoding)."""
    bundle = images.fashion_mnist(image_size=16, batch_size=32, classes=[5, 7, 9], num_classes=3, train_limit=300)

    def trainer(run_dir):
        return Trainer(model=lambda: keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                                                       keras.layers.Dense(3)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1),
                       run_dir=run_dir, progress_bar=False, checkpoint_every=0)

    full = trainer(tmp_path / "full")
    full.fit(bundle.train, steps=12)  # 9 steps per epoch: the resumed run crosses an epoch
    trainer(tmp_path / "resumed").fit(bundle.train, steps=5)
    resumed = trainer(tmp_path / "resumed")
    resumed.fit(bundle.train, steps=12)
    for a, b in zip(full.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fashion_mnist_shards_are_disjoint_per_input_pipeline():
    bundle = images.fashion_mnist(image_size=16, batch_size=64, classes=[0, 1], num_classes=2, preprocessing="none")
    shards = []
    for pipeline in (0, 1):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        assert batches(bundle.train, 1, ctx)[0][0].shape[0] == 32  # per-replica batch
        shards.append(all_batches(bundle.eval, ctx)[0].reshape(-1, 16 * 16 * 3))
    everything = all_batches(bundle.eval)[0].reshape(-1, 16 * 16 * 3)
    assert len(shards[0]) + len(shards[1]) == len(everything) == 2000
    np.testing.assert_array_equal(np.concatenate([shards[0], shards[1]])[np.lexsort(np.concatenate(shards).T)],
                                  everything[np.lexsort(everything.T)])


def test_augmentation_is_stateless_and_label_preserving(fashion):
    image = tf.constant(np.repeat(fashion[0][0][..., None], 3, axis=-1))  # a real 28x28 RGB image
    for augment in ("flip", "pad_crop", "resized_crop"):
        transform = ImageTransform(image_size=28, augment=augment, preprocessing="none")
        key = tf.constant([3, 4], tf.int64)
        np.testing.assert_array_equal(transform.train(image, key).numpy(), transform.train(image, key).numpy())
        outputs = [transform.train(image, tf.constant([3, k], tf.int64)).numpy() for k in range(12)]
        assert all(o.shape == (28, 28, 3) for o in outputs)
        assert len({o.tobytes() for o in outputs}) > 1, augment  # the key changes the crop / flip
    flip = ImageTransform(image_size=28, augment="flip", preprocessing="none")
    original, mirrored = image.numpy().astype("float32"), image.numpy()[:, ::-1].astype("float32")
    seen = {("orig" if np.array_equal(o, original) else "mirror" if np.array_equal(o, mirrored) else "other")
            for o in (flip.train(image, tf.constant([0, k], tf.int64)).numpy() for k in range(16))}
    assert seen == {"orig", "mirror"}
    with pytest.raises(ValueError, match="data.augment"):
        ImageTransform(image_size=28, augment="mixup")


def write_image_folder(root: Path, fashion, per_class=6):
    """Real images in class folders: PNG (grey, one channel) and JPEG (RGB), like a scraped data set."""
    x_train, y_train, _, _ = fashion
    originals = {}
    for name, label in (("bag", 8), ("sandal", 5), ("sneaker", 7)):
        folder = root / name
        folder.mkdir(parents=True)
        picks = x_train[y_train == label][:per_class]
        originals[name] = picks
        for i, img in enumerate(picks):
            if i % 2:
                data = tf.io.encode_jpeg(np.repeat(img[..., None], 3, -1), quality=95)
                (folder / f"{i}.jpg").write_bytes(data.numpy())
            else:
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(img[..., None]).numpy())
    return originals


def test_image_folder_reads_real_png_and_jpeg(tmp_path, fashion):
    originals = write_image_folder(tmp_path / "train", fashion)
    bundle = images.image_folder(
        train_dir=str(tmp_path / "train"), num_classes=3, validation_split=1 / 3, image_size=16, batch_size=4,
        augment="resized_crop", eval_crop=1.0, preprocessing="none", seed=0,
    )
    assert bundle.train_examples == 12 and "3 classes (bag, sandal, sneaker)" in bundle.description
    x_eval, y_eval = all_batches(bundle.eval)
    assert sorted(y_eval.tolist()) == [0, 0, 1, 1, 2, 2]  # 2 of 6 per class held out, classes sorted by name
    for image, label in zip(x_eval, y_eval):
        name = ["bag", "sandal", "sneaker"][label]
        # Each eval image is one of its own class's originals, resized (JPEG adds a little noise).
        assert min(np.abs(image - resized(o, 16)).mean() for o in originals[name]) < 3.0
    for x, y in batches(bundle.train, 4):  # random crops of JPEG (decode_and_crop) and PNG files
        assert x.shape == (4, 16, 16, 3) and set(y) <= {0, 1, 2} and np.isfinite(x).all()

    with pytest.raises(DataError, match="data.num_classes=3"):
        images.image_folder(train_dir=str(tmp_path / "train"), num_classes=10)
    with pytest.raises(DataError, match="does not exist"):
        images.image_folder(train_dir=str(tmp_path / "nowhere"), num_classes=3)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        images.image_folder(train_dir=str(tmp_path / "empty"), num_classes=1)


def write_tfrecords(path: Path, examples, image_key="image/encoded"):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for encoded, label in examples:
            feature = {
                image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_tfrecord_imagenet_layout(tmp_path, fashion):
    x_train, y_train, _, _ = fashion
    # Three real classes stored with ImageNet's 1-based labels (3, 1, 2), JPEG-encoded, in two shards.
    stored = {9: 3, 1: 1, 7: 2}
    chosen = [(x_train[y_train == c][i], stored[c]) for i in range(4) for c in stored]
    encoded = [(tf.io.encode_jpeg(np.repeat(img[..., None], 3, -1), quality=95).numpy(), label)
               for img, label in chosen]
    write_tfrecords(tmp_path / "train-00000-of-00002", encoded[:6])
    write_tfrecords(tmp_path / "train-00001-of-00002", encoded[6:])
    write_tfrecords(tmp_path / "validation-00000-of-00001", encoded)
    bundle = images.tfrecord(
        train_files=str(tmp_path / "train-*"), eval_files=str(tmp_path / "validation-*"), num_classes=3,
        label_offset=-1, image_size=16, batch_size=4, eval_crop=1.0, preprocessing="caffe", train_examples=12,
    )
    assert "2 files, 12 train records" in bundle.description
    x_eval, y_eval = all_batches(bundle.eval)
    np.testing.assert_array_equal(y_eval, [label - 1 for _, label in chosen])
    for image, (original, _) in zip(x_eval, chosen):
        want = preprocess(tf.constant(resized(original, 16)), "caffe").numpy()
        assert np.abs(image - want).mean() < 3.0
    first = batches(bundle.train, 3)
    assert first[0][0].shape == (4, 16, 16, 3) and set(np.concatenate([y for _, y in first])) <= {0, 1, 2}
    for (xa, _), (xb, _) in zip(first, batches(bundle.train, 3)):
        np.testing.assert_array_equal(xa, xb)

    with pytest.raises(DataError, match="label_offset=-1"):  # the first stored label is 3: outside 0..2
        images.tfrecord(train_files=str(tmp_path / "train-*"), num_classes=3)
    with pytest.raises(DataError, match="matches no files"):
        images.tfrecord(train_files=str(tmp_path / "nothing-*"), num_classes=3)
    # A label out of range after the first record (stored 1 then 3: 0 and 2 with the offset) is found before training.
    write_tfrecords(tmp_path / "mixed.tfrecord", [encoded[1], encoded[0]])
    with pytest.raises(DataError, match=r"first 2 records.*labels 0\.\.2 .*but data.num_classes=2"):
        images.tfrecord(train_files=str(tmp_path / "mixed.tfrecord"), num_classes=2, label_offset=-1)
    (tmp_path / "bad.tfrecord").write_bytes(b"this is not a TFRecord file at all")
    with pytest.raises(DataError, match="not a readable TFRecord"):
        images.tfrecord(train_files=str(tmp_path / "bad.tfrecord"), num_classes=3)
    write_tfrecords(tmp_path / "other.tfrecord", encoded[:2], image_key="image/png")
    with pytest.raises(DataError, match="data.image_key"):
        images.tfrecord(train_files=str(tmp_path / "other.tfrecord"), num_classes=3, label_offset=-1)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow-datasets is installed")
def test_tfds_without_the_package_says_how_to_install():
    with pytest.raises(DataError, match="pip install tensorflow-datasets"):
        images.tfds(name="cifar10", num_classes=10)


def test_synthetic_is_loudly_labelled():
    bundle = images.synthetic(image_size=32, num_classes=5, batch_size=8, eval_batches=2)
    assert "SYNTHETIC" in bundle.description and "NOT real data" in bundle.description
    x, y = batches(bundle.train, 1)[0]
    assert x.shape == (8, 32, 32, 3) and y.max() < 5
    assert len(list(bundle.eval(None))) == 2


# ---------------------------------------------------------------------------------------------
# Models, weights, loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,convs3x3", [("resnet20", 19), ("resnet56", 55)])
def test_cifar_resnets_have_the_papers_depth(name, convs3x3):
    model = resnet.build_model(name, num_classes=10, image_size=32)
    backbone = model.get_layer("backbone")
    n3 = sum(isinstance(l, keras.layers.Conv2D) and l.kernel_size == (3, 3) for l in backbone.layers)
    assert n3 == convs3x3  # + the Dense head: 6n+2 weighted layers
    if name == "resnet20":
        assert 0.26e6 < model.count_params() < 0.29e6  # the paper: 0.27M
    out = model(np.zeros((2, 32, 32, 3), "float32"))
    assert out.shape == (2, 10) and out.dtype == "float32"


def test_unknown_model_and_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="resnet20"):
        resnet.build_model("resnet21")
    with pytest.raises(ValueError, match="no ImageNet weights for resnet20"):
        resnet.build_model("resnet20", weights="imagenet")
    with pytest.raises(ValueError, match="neither none, imagenet nor an existing"):
        resnet.build_model("resnet20", weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="model.preprocessing=caffe"):
        resnet.build_model("resnet50", weights="imagenet", image_size=32, preprocessing="tf")


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras, on the mismatched file
def test_backbone_weights_from_a_local_file(tmp_path):
    source = resnet.build_model("resnet8", num_classes=3, image_size=16)
    path = tmp_path / "backbone.weights.h5"
    source.get_layer("backbone").save_weights(path)
    model = resnet.build_model("resnet8", weights=str(path), num_classes=7, image_size=16)
    for a, b in zip(source.get_layer("backbone").weights, model.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="trainer.init_from"):
        resnet.build_model("resnet14", weights=str(path), image_size=16)


def test_imagenet_weights_offline_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache; the download fails offline
    with pytest.raises(ValueError) as e:
        resnet.build_model("resnet50", weights="imagenet", image_size=32, preprocessing="caffe")
    message = str(e.value)
    assert str(tmp_path / "models") in message and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "model.weights=/path/to/" in message


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    """A file in Keras' legacy .h5 layout at the name keras.applications uses is loaded without the network."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = resnet.build_model("resnet50", weights="imagenet", num_classes=4, image_size=32, preprocessing="caffe")
    for a, b in zip(reference.weights[::25], model.get_layer("backbone").weights[::25]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 4)


def test_label_smoothing_loss():
    logits = tf.constant([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = tf.constant([0, 2])
    plain = resnet.SparseCrossentropyWithSmoothing(label_smoothing=0.0, reduction=None)
    np.testing.assert_allclose(plain(labels, logits),
                               keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True),
                               rtol=1e-6)
    smooth = resnet.SparseCrossentropyWithSmoothing(label_smoothing=0.3)
    per_example = type(smooth).from_config({**smooth.get_config(), "reduction": None})  # what the trainer does
    targets = np.eye(3)[[0, 2]] * 0.7 + 0.1
    want = -(targets * tf.nn.log_softmax(logits).numpy()).sum(-1)
    np.testing.assert_allclose(per_example(labels, logits).numpy(), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuning, warm start, precision (through the Trainer, on real images)
# ---------------------------------------------------------------------------------------------


class Snapshots(Callback):
    """Every weight's value at the start and after each loop (steps_per_loop=1: after each step)."""

    def __init__(self):
        self.at = {}

    def _take(self, trainer, step):
        self.at[step] = {v.path: v.numpy().copy() for v in trainer.model.weights}

    def on_train_begin(self, trainer):
        self._take(trainer, int(trainer.step.numpy()))

    def on_loop_end(self, trainer, step):
        self._take(trainer, step)


def small_data(batch_size=16, classes=None):
    return images.fashion_mnist(
        image_size=16, batch_size=batch_size, train_limit=512, preprocessing="tf",
        classes=classes, num_classes=len(classes) if classes else 10,
    )


def make_trainer(callbacks=(), num_classes=10, lr=0.05, **options):
    return Trainer(
        model=lambda: resnet.build_model("resnet8", num_classes=num_classes, image_size=16),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(lr),  # plain SGD: a gradient multiplier is a learning rate
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        callbacks=list(callbacks),
        progress_bar=False,
        log_every=100,
        **options,
    )


def _changed(before, after, paths):
    return {p for p in paths if not np.array_equal(before[p], after[p])}


def test_freeze_then_unfreeze_with_lower_backbone_rate(caplog):
    data = small_data()
    runs = {}
    for mult in (1.0, 0.25):
        snaps = Snapshots()
        trainer = make_trainer([resnet.FineTune(freeze_steps=2, backbone_lr_mult=mult), snaps])
        trainer.fit(data.train, steps=4)
        runs[mult] = (trainer, snaps.at)

    trainer, at = runs[0.25]
    backbone = {v.path for v in trainer.model.get_layer("backbone").weights}
    head = {v.path for v in trainer.model.get_layer("logits").weights}
    moving = {p for p in backbone if "moving_" in p}
    # Steps 1-2, frozen: nothing in the backbone moves, BatchNorm statistics included (inference mode).
    assert _changed(at[0], at[2], backbone) == set()
    assert _changed(at[0], at[2], head) == head
    # Steps 3-4, unfrozen: every backbone variable trains and BatchNorm updates its statistics again.
    assert _changed(at[2], at[4], backbone) == backbone
    assert moving and _changed(at[2], at[4], moving) == moving
    assert trainer.traces["train"] == 2  # re-traced once, when the trainable set changed
    assert "traced more than once" not in caplog.text  # that retrace is FineTune's own: no warning about it
    assert {trainer.grad_multipliers[v.path] for v in trainer.model.get_layer("backbone").trainable_variables} == {0.25}

    # The first unfrozen step (3) starts from the same state in both runs: the backbone moves 0.25x as
    # far with backbone_lr_mult=0.25, the head as far.
    full = runs[1.0][1]
    for path in backbone - moving:
        np.testing.assert_allclose(full[2][path], at[2][path], rtol=1e-4, atol=1e-6)

    def step3(run, paths):
        return np.sqrt(sum(float(((run[3][p] - run[2][p]) ** 2).sum()) for p in paths))

    kernels = {p for p in backbone if p.endswith("kernel")}
    assert step3(at, kernels) / step3(full, kernels) == pytest.approx(0.25, rel=0.02)
    assert step3(at, head) / step3(full, head) == pytest.approx(1.0, rel=0.02)


def test_resumed_past_freeze_steps_starts_unfrozen():
    data = small_data()
    trainer = make_trainer()
    trainer.build(next(iter(data.train(None))))
    trainer.step.assign(7)  # as if restored from a checkpoint at step 7
    finetune = resnet.FineTune(freeze_steps=5, backbone_lr_mult=0.1)
    finetune.on_train_begin(trainer)
    backbone = trainer.model.get_layer("backbone")
    assert backbone.trainable and not finetune.frozen
    assert len(trainer.model.trainable_variables) == len(backbone.trainable_variables) + 2
    assert all(trainer.grad_multipliers[v.path] == 0.1 for v in backbone.trainable_variables)
    trainer.step.assign(3)  # before freeze_steps: frozen, no multipliers
    finetune.on_train_begin(trainer)
    assert (not backbone.trainable
            and [v.path for v in trainer.model.trainable_variables] == ["logits/kernel", "logits/bias"])
    assert not trainer.grad_multipliers


@pytest.mark.slow
def test_init_from_restores_backbone_and_gives_a_new_head(tmp_path):
    first = make_trainer(num_classes=5, run_dir=tmp_path / "pretrain")
    first.fit(small_data(classes=[0, 1, 2, 3, 4]).train, steps=3)
    pretrained = {v.path: v.numpy().copy() for v in first.model.weights}
    backbone = [v.path for v in first.model.get_layer("backbone").weights]

    # Another head shape (5 -> 3 classes): the backbone is restored, the head stays at its init.
    snaps = Snapshots()
    other = make_trainer([snaps], num_classes=3, init_from=str(tmp_path / "pretrain"))
    other.fit(small_data(classes=[5, 6, 7]).train, steps=1)
    for p in backbone:
        np.testing.assert_array_equal(snaps.at[0][p], pretrained[p])
    assert snaps.at[0]["logits/kernel"].shape[-1] == 3

    # Same head shape: new_head=True re-initializes it instead of keeping the old task's classifier.
    for new_head in (False, True):
        snaps = Snapshots()
        same = make_trainer([resnet.FineTune(new_head=new_head), snaps], num_classes=5,
                            init_from=str(tmp_path / "pretrain"))
        same.fit(small_data(classes=[5, 6, 7, 8, 9]).train, steps=1)
        for p in backbone:
            np.testing.assert_array_equal(snaps.at[0][p], pretrained[p])
        kept = np.array_equal(snaps.at[0]["logits/kernel"], pretrained["logits/kernel"])
        assert kept != new_head


@pytest.mark.parametrize("policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_steps_have_float32_outputs(policy, compute):
    data = small_data(batch_size=8)
    trainer = make_trainer(precision=policy)
    logs = trainer.fit(data.train, steps=2)
    assert math.isfinite(logs["loss"])
    x, _ = next(iter(data.train(None)))
    assert trainer.model(x).dtype == "float32"
    convs = [l for l in trainer.model.get_layer("backbone").layers if isinstance(l, keras.layers.Conv2D)]
    assert {l.compute_dtype for l in convs} == {compute}
    assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}
    assert int(trainer.optimizer.iterations.numpy()) == 2 and int(trainer.loss_scale.skipped_steps.numpy()) == 0


# ---------------------------------------------------------------------------------------------
# The real CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_resnet_then_finetune_from_that_run(tmp_path):
    common = ["trainer.log_every=10", "trainer.eval_steps=10", "trainer.progress_bar=false", "data.image_size=16",
              "data.batch_size=32"]
    pretrain = tmp_path / "pretrain"
    result = run_cli(
        "recipe=resnet", "trainer.max_steps=40", "trainer.eval_every=0", "optimizer.warmup_steps=5",
        "data.classes=[0,1,2,3,4]", "data.num_classes=5", *common, f"hydra.run.dir={pretrain}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Fashion-MNIST (real images)" in out and re.search(r"Model:? resnet20", out)
    rows = read_metrics(pretrain)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"]
    assert rows[-1]["split"] == "eval" and rows[-1]["accuracy"] > 0.4  # 5 classes: chance is 0.2
    assert (pretrain / "checkpoints" / "ckpt-40.index").exists()

    finetune = tmp_path / "finetune"
    result = run_cli(
        "recipe=resnet_finetune", f"trainer.init_from={pretrain}", "data.classes=[5,6,7,8,9]", "data.num_classes=5",
        "trainer.max_steps=20", "finetune.freeze_steps=10", *common, f"hydra.run.dir={finetune}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Warm start from" in out and "FineTune: new head" in out
    assert "backbone frozen until step 10" in out and "backbone trainable at step 10" in out
    assert "traced more than once" not in out  # the step traced again on unfreezing is no accidental retrace
    assert "freshly initialized (random) weights" not in out  # the backbone came from the pretrain run
    assert read_metrics(finetune)[-1]["step"] == 20


@pytest.mark.slow
def test_cli_finetune_without_pretrained_weights_says_so_before_training():
    """recipe=resnet_finetune with neither trainer.init_from nor model.weights freezes a random backbone: the run
    learns next to nothing, so a warning before the first step names the cause and both ways to give weights."""
    result = run_cli("recipe=resnet_finetune", "trainer.fast_dev_run=true", "data.image_size=16", "data.batch_size=8",
                     "trainer.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    warning = next(line for line in out.splitlines() if "freshly initialized (random) weights" in line)
    assert "WARNING" in warning and "frozen for the first 20 steps" in warning
    assert "trainer.init_from=RUN_DIR" in warning and "model.weights=imagenet|PATH" in warning
    assert out.index("freshly initialized (random) weights") < out.index("First loop")  # before training

    never_frozen = run_cli("recipe=resnet_finetune", "trainer.fast_dev_run=true", "data.image_size=16",
                           "data.batch_size=8", "trainer.progress_bar=false", "finetune.freeze_steps=0")
    out = never_frozen.stdout + never_frozen.stderr
    warning = next(line for line in out.splitlines() if "freshly initialized (random) weights" in line)
    assert "the backbone learns slowly from random features" in warning and "frozen" not in warning, warning
