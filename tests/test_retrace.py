"""The run summary's "traced more than once" warning (callbacks/progress.py, step_functions.py): it names
TensorFlow tracing the same step function again (batches of another shape), and stays quiet when a step
function is made anew on purpose (reset_step_functions after unfreezing layers, as fine-tuning does), which
would otherwise teach users to ignore it."""
import keras
import tensorflow as tf
import pytest

from conftest import blobs
from trainer import Callback, Trainer

WARNING = "Step functions were traced more than once"


class Summaries(Callback):
    """The summary each fit() call ends with."""

    def __init__(self):
        self.seen = []

    def on_train_end(self, trainer, summary):
        self.seen.append(summary)


class Unfreeze(Callback):
    """A user's fine-tuning: the first layer frozen until `step`, then trainable; the step is traced again."""

    def __init__(self, step):
        self.step = step

    def on_train_begin(self, trainer):
        trainer.model.layers[0].trainable = False
        trainer.reset_step_functions()

    def on_loop_end(self, trainer, step):
        if step == self.step:
            trainer.model.layers[0].trainable = True
            trainer.reset_step_functions()


def build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


def make(callbacks=(), model=build, **options):
    return Trainer(model=model,
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.1), callbacks=callbacks, progress_bar=False,
                   log_every=2, jit_compile=False, **options)


@pytest.fixture
def warnings_seen(caplog):
    caplog.set_level("INFO", logger="trainer")
    return lambda: [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_a_step_traced_anew_after_unfreezing_layers_does_not_warn(warnings_seen):
    summaries = Summaries()
    trainer = make([Unfreeze(step=2), summaries], eval_every=1)
    trainer.fit(blobs(), blobs(n=64), steps=4)
    # evaluated at step 1 frozen, then from step 2 on unfrozen: both functions were traced again
    assert trainer.model.layers[0].trainable and trainer.traces == {"train": 2, "eval": 2}
    assert warnings_seen() == []
    assert summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}


def test_the_same_step_traced_again_for_batches_of_another_shape_still_warns(warnings_seen):
    summaries = Summaries()
    trainer = make([summaries])
    trainer.fit(blobs(batch=16), steps=2)
    assert warnings_seen() == [] and summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}
    trainer.fit(blobs(batch=8), steps=4)  # the kept train function, given batches of 8: TensorFlow traces it again
    assert trainer.traces["train"] == 2 and summaries.seen[-1]["retraces"] == {"train": 1, "eval": 0}
    said = warnings_seen()
    assert len(said) == 1 and "the same function again {'train': 1}" in said[0] and "pad or bucket" in said[0]
    trainer.fit(blobs(batch=8), steps=6)  # no new retrace in this call: no warning again
    assert len(warnings_seen()) == 1 and summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}


class UnfreezeWithoutReset(Callback):
    """A hand-written unfreeze that forgets reset_step_functions(): the Trainer notices by itself."""

    def __init__(self, step):
        self.step, self.kernel_at_unfreeze = step, None

    def on_train_begin(self, trainer):  # after the optimizer was built for every variable
        trainer.model.layers[0].trainable = False

    def on_loop_end(self, trainer, step):
        if step == self.step:
            trainer.model.layers[0].trainable = True
            self.kernel_at_unfreeze = trainer.model.layers[0].kernel.numpy().copy()


def test_unfreezing_in_a_callback_without_a_reset_trains_the_unfrozen_layers(warnings_seen, caplog):
    unfreeze = UnfreezeWithoutReset(step=2)
    trainer = make([unfreeze])
    trainer.fit(blobs(), steps=4)
    assert not (trainer.model.layers[0].kernel.numpy() == unfreeze.kernel_at_unfreeze).all()
    assert any("became trainable" in r.getMessage() and "kernel" in r.getMessage() for r in caplog.records)
    assert warnings_seen() == [] and trainer.traces["train"] == 2


class Freeze(Callback):
    def on_train_begin(self, trainer):  # no reset_step_functions(): the Trainer notices by itself
        trainer.model.layers[0].trainable = False


def test_freezing_between_fits_without_a_reset_keeps_the_frozen_weights(warnings_seen, tmp_path):
    trainer = make(run_dir=str(tmp_path / "run"))
    trainer.fit(blobs(), steps=2)
    trainer.model.layers[0].trainable = False
    frozen = [w.numpy().copy() for w in trainer.model.layers[0].weights]
    trained = trainer.model.layers[1].kernel.numpy().copy()
    trainer.fit(blobs(), steps=4)
    assert all((w.numpy() == f).all() for w, f in zip(trainer.model.layers[0].weights, frozen))
    assert not (trainer.model.layers[1].kernel.numpy() == trained).all()
    assert warnings_seen() == []
    resumed = make([Freeze()], run_dir=str(tmp_path / "run"))  # a checkpoint of the frozen run resumes
    resumed.fit(blobs(), steps=6)
    assert int(resumed.step.numpy()) == 6
    assert all((w.numpy() == f).all() for w, f in zip(resumed.model.layers[0].weights, frozen))


def test_assigning_grad_multipliers_mid_run_takes_effect():
    class Zero(Callback):
        def on_loop_end(self, trainer, step):
            if step == 2:
                trainer.grad_multipliers = {v.path: 0.0 for v in trainer.model.trainable_variables}
                self.weights = [v.numpy().copy() for v in trainer.model.trainable_variables]

    zero = Zero()
    trainer = make([zero])
    trainer.fit(blobs(), steps=4)
    assert all((v.numpy() == w).all() for v, w in zip(trainer.model.trainable_variables, zero.weights))


def test_a_reset_in_every_loop_warns_with_the_cost(caplog):
    class ResetEveryLoop(Callback):
        def on_loop_end(self, trainer, step):
            trainer.reset_step_functions()

    caplog.set_level("INFO", logger="trainer")
    summaries = Summaries()
    make([ResetEveryLoop(), summaries]).fit(blobs(), steps=8)
    made = summaries.seen[-1]["made"]["train"]
    assert made > 2 and summaries.seen[-1]["retraces"]["train"] == 0
    said = [r.getMessage() for r in caplog.records if "made anew" in r.getMessage()]
    assert len(said) == 1 and f"'train': {made}" in said[0] and "reset_step_functions()" in said[0]


def test_a_retrace_in_a_standalone_evaluate_is_reported_by_the_next_summary(warnings_seen):
    summaries = Summaries()
    trainer = make([summaries])
    trainer.fit(blobs(batch=16), blobs(batch=16), steps=2)
    trainer.evaluate(blobs(batch=8))  # the kept eval function, given batches of another shape
    trainer.fit(blobs(batch=16), steps=4)
    assert summaries.seen[-1]["retraces"] == {"train": 0, "eval": 1}
    assert len(warnings_seen()) == 1 and "{'eval': 1}" in warnings_seen()[0]


def test_a_layer_edit_retraces_the_trainers_of_that_model_only_and_keeps_their_eval_functions():
    from trainer.recompute import recompute

    shared = build()
    first, second, other = make(model=shared), make(model=shared), make()
    for trainer in (first, second, other):
        trainer.fit(blobs(), blobs(n=32), steps=2)
    recompute(shared.layers[0])  # in place: both Trainers of `shared` must trace again, `other` need not
    recompute(build().layers[0])  # a model no Trainer uses
    for trainer in (first, second, other):
        trainer.fit(blobs(), blobs(n=32), steps=4)
    # recomputation acts only under a gradient tape: the eval functions compute as before and are kept
    assert first.traces == second.traces == {"train": 2, "eval": 1}
    assert other.traces == {"train": 1, "eval": 1}


def test_a_model_that_is_no_keras_model_is_refused_naming_the_fix():
    from trainer.fused_elementwise import fuse_elementwise

    with pytest.raises(TypeError, match=r"fuse_elementwise\(model\); Trainer\(model=model\)"):
        make(model=fuse_elementwise(build()))


def build_first_layer_frozen():
    model = build()
    model.layers[0].trainable = False  # in the builder: the optimizer is built without this layer
    return model


class UnfreezeAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_loop_end(self, trainer, step):
        if step == self.step:
            trainer.model.layers[0].trainable = True


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_unfreezing_a_layer_frozen_in_the_builder_is_refused_naming_the_fix(grad_accum_steps, tmp_path):
    from trainer.errors import UserError

    run = str(tmp_path / "run")
    trainer = make([UnfreezeAt(step=2)], model=build_first_layer_frozen, run_dir=run,
                   grad_accum_steps=grad_accum_steps)
    with pytest.raises(UserError, match=r"frozen when the Trainer built its optimizers.*on_train_begin") as e:
        trainer.fit(blobs(), steps=4)
    assert "sequential" in str(e.value) and "kernel" in str(e.value)
    assert int(trainer.step.numpy()) == 2  # refused before the next step
    resumed = make(model=build_first_layer_frozen, run_dir=run, grad_accum_steps=grad_accum_steps)
    resumed.fit(blobs(), steps=4)  # the run folder still resumes, the layer frozen as it was built
    assert int(resumed.step.numpy()) == 4


class GanStep(Trainer):
    """A Keras 2 habit: the step itself makes the discriminator trainable for its update, then frozen."""

    def train_step(self, data):
        x, _ = data
        g, d = self.models["g"], self.models["d"]
        d.trainable = True
        with tf.GradientTape() as tape:
            d_loss = tf.reduce_mean(tf.square(d(g(x, training=True), training=True)))
        self.update(d_loss, tape, "d")
        d.trainable = False
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(d(g(x, training=True), training=True))
        self.update(g_loss, tape, "g")
        return {"d_loss": d_loss, "g_loss": g_loss}


def test_a_step_that_sets_trainable_itself_is_traced_once(caplog):
    caplog.set_level("INFO", logger="trainer")
    dense = lambda units: lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])  # noqa: E731
    trainer = GanStep(models={"g": dense(4), "d": dense(1)}, best_metric=None, progress_bar=False, log_every=2,
                      optimizers={"g": keras.optimizers.Adam(1e-3), "d": keras.optimizers.Adam(1e-3)},
                      jit_compile=False)
    trainer.fit(blobs(), steps=8)
    assert trainer.traces["train"] == 1
    assert not [r for r in caplog.records if "traced again" in r.getMessage()]
