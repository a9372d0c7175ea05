"""trainer.fused_optimizer: Keras' Adam/AdamW/SGD(momentum) updates as one TensorFlow kernel per variable,
with Keras' values; a step XLA compiles whole keeps Keras' ops."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_step import data, make
from trainer import Trainer


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_optimizer_updates_equal_keras_updates(name):
    """trainer.fused_optimizer swaps Keras' ops for one TF kernel per variable: the same arithmetic,
    up to rounding (Adam and weight decay: 1-2 ulps per step, which training then carries; SGD: bitwise)."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    for steps, atol, rtol in ((1, 2e-7, 0), (12, 2e-6, 1e-4)):
        trained = {}
        for fused in (True, False):
            trainer = make(fused_optimizer=fused, optimizer=OPTIMIZERS[name])
            trainer.fit(ds, steps=steps)
            assert ("update_step" in vars(trainer.optimizer)) == fused  # fused: an instance-level update_step
            trained[fused] = ([w.numpy() for w in trainer.model.weights]
                              + [v.numpy() for v in trainer.optimizer.variables])
        for a, b in zip(trained[True], trained[False]):
            if name == "sgd_nesterov":
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _counting_adam_kernels(monkeypatch):
    """How many of TF's fused Adam kernels the traces made (fused.py calls it through tf.raw_ops)."""
    made, kernel = [], tf.raw_ops.ResourceApplyAdam
    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", lambda **kw: (made.append(1), kernel(**kw))[1])
    return made


def test_a_step_xla_compiles_whole_takes_keras_update_ops(caplog, monkeypatch):
    """Inside XLA the fused kernels' lowering is slower than Keras' ops, which XLA fuses itself: a Trainer
    whose whole step XLA compiles trains bit for bit as with fused_optimizer=false, and says so; outside XLA
    (xla_whole_step=false: the update runs after the compiled forward and backward) the kernels stay."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    kernels = _counting_adam_kernels(monkeypatch)
    trained = {}
    for fused, whole_step in ((True, True), (False, True), (True, False)):
        kernels.clear()
        with caplog.at_level(logging.INFO, logger="trainer.core"):
            trainer = make(fused_optimizer=fused, optimizer=OPTIMIZERS["adamw"], jit_compile=True,
                           xla_whole_step=whole_step)
            trainer.fit(ds, steps=6)
        trained[fused, whole_step] = [w.numpy() for w in trainer.model.weights + trainer.optimizer.variables]
        assert ("the update is Keras' ops, which XLA fuses" in caplog.text) == (fused and whole_step)
        assert bool(kernels) == (fused and not whole_step)
        caplog.clear()
    for a, b in zip(trained[True, True], trained[False, True]):
        np.testing.assert_array_equal(a, b)


def test_a_second_trainer_of_a_fused_optimizer_follows_its_own_settings(monkeypatch):
    """Two Trainers of one optimizer (a notebook's second fit setup): the second's whole XLA step is Keras'
    ops, and fused_optimizer=false switches the kernels the first one installed off."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    optimizer = keras.optimizers.Adam(0.01)
    kernels = _counting_adam_kernels(monkeypatch)
    first = make(optimizer=lambda: optimizer)
    first.fit(ds, steps=2)
    assert kernels
    for options in ({"jit_compile": True}, {"fused_optimizer": False}):
        kernels.clear()
        second = Trainer(model=first.model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         optimizer=optimizer, seed=0, progress_bar=False, **options)
        second.fit(ds, steps=4)
        assert not kernels, options


def adamw_sparing_biases():
    optimizer = keras.optimizers.AdamW(0.05, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def test_fused_updates_of_an_embeddings_sparse_gradient_and_weight_decay_equal_keras():
    """An embedding's gradient is IndexedSlices with repeated rows (token 3 appears twice per sequence):
    Keras' Adam squares each gathered row before summing, the fused kernel (one per variable, the
    embedding's too) gives the same; AdamW's decay (all but biases) is one pass."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(64, 6)).astype("int32")
    tokens[:, :2] = 3
    labels = (tokens[:, 2] > 9).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(16, drop_remainder=True)
    trained = {}
    for fused in (True, False):
        trainer = Trainer(
            model=lambda: keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(20, 8),
                                            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=adamw_sparing_biases,
            seed=0, log_every=1, progress_bar=False, fused_optimizer=fused,
        )
        trainer.fit(ds.repeat(), steps=8)
        trained[fused] = [w.numpy() for w in trainer.model.weights] + [v.numpy() for v in trainer.optimizer.variables]
    for a, b in zip(trained[True], trained[False]):
        # Adam carries rounding; the decay moves w by 5e-3 w a step
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_sparse_gradient_with_repeated_rows_is_one_adam_kernel_with_keras_values():
    from trainer.fused import fuse

    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 3)).astype("float32")
    gradients = [tf.IndexedSlices(tf.constant(rng.normal(size=(4, 3)).astype("float32")), tf.constant([1, 4, 1, 1]),
                                  tf.constant([6, 3])) for _ in range(3)]
    tables = {}
    for fused in (True, False):
        table, adam = keras.Variable(start), keras.optimizers.Adam(0.1)
        if fused:
            assert fuse(adam)
        adam.build([table])
        apply = tf.function(lambda g: adam.apply([g], [table]))
        for gradient in gradients:
            apply(gradient)
        if fused:
            graph = apply.get_concrete_function(gradients[0]).graph
            assert [op.type for op in graph.get_operations()].count("ResourceApplyAdam") == 1
        tables[fused] = [table.numpy(), *(v.numpy() for v in adam.variables[1:])]
    for a, b in zip(tables[True], tables[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_update_is_one_kernel_per_variable_and_skips_what_it_cannot_express():
    from trainer.fused import fuse

    variables = [keras.Variable(np.ones((4, 3), "float32")), keras.Variable(np.ones(3, "float32"))]
    grads = [tf.ones((4, 3)), tf.ones(3)]

    def op_types(optimizer, full_size_only=False):
        optimizer.build(variables)
        graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
        return [op.type for op in graph.get_operations()
                if not full_size_only or op.outputs and op.outputs[0].shape.rank]

    adam = keras.optimizers.Adam()
    assert fuse(adam)
    assert op_types(adam).count("ResourceApplyAdam") == 2
    sgd = keras.optimizers.SGD(momentum=0.9)
    assert fuse(sgd)
    assert op_types(sgd).count("ResourceApplyKerasMomentum") == 2
    adamw, keras_adamw = keras.optimizers.AdamW(weight_decay=0.1), keras.optimizers.AdamW(weight_decay=0.1)
    assert fuse(adamw)
    assert op_types(adamw).count("ResourceApplyAdam") == 2
    # The decay: one full-size multiply per variable (Keras: two, w * wd * lr).
    assert op_types(adamw, full_size_only=True).count("Mul") == 2
    keras_decay = (op_types(keras_adamw, full_size_only=True).count("Mul")
                   - op_types(keras.optimizers.Adam(), full_size_only=True).count("Mul"))
    assert keras_decay == 4
    assert not fuse(keras.optimizers.Adam(amsgrad=True))  # no kernel for it: Keras' update stays
    assert not fuse(keras.optimizers.RMSprop())  # TF's kernel puts epsilon inside the sqrt: not Keras' formula
