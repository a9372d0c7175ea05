"""What Keras and Lightning users write that the Trainer does another way: a Trainer() keyword of theirs or a
misspelt one, Keras' callbacks given as callbacks, Keras' arguments of EarlyStopping/ReduceLROnPlateau. Each is
refused at once, a TypeError (and a UserError: exit 2 from the CLI) naming the Trainer's way, never a traceback
from dataclasses.py or from fit()'s middle. Tiny models through the public API."""
from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

from conftest import blobs
from trainer import EarlyStopping, ReduceLROnPlateau, Trainer, warm_start
from trainer.errors import UserError


def make(built=None, **options):
    """A Trainer of a tiny classifier; `built` (a list) records each time the model is built."""
    def model():
        if built is not None:
            built.append(1)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    return Trainer(model=model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.05),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                   progress_bar=False, tensorboard=False, verbose=False, **options)


def refused(call, *said):
    """The TypeError (a UserError) `call` raises, its message holding each of `said`."""
    with pytest.raises(TypeError) as raised:
        call()
    message = str(raised.value)
    assert isinstance(raised.value, UserError), message
    assert all(s in message for s in said), message
    return message


@pytest.mark.parametrize("options, said", [
    ({"max_step": 20}, "Trainer() got an unexpected keyword argument 'max_step'. Fix: did you mean "
                       "Trainer(max_steps=20)?"),
    ({"eval_freq": 5}, "Fix: did you mean Trainer(eval_every=5)?"),
    ({"val_check_interval": 5}, "Fix: did you mean Trainer(eval_every=5)?"),  # Lightning's
    ({"max_epochs": 3}, "Fix: did you mean Trainer(epochs=3)?"),  # Lightning's
    ({"ckpt_path": "runs/a/checkpoints/ckpt-5"}, "Fix: did you mean Trainer(resume_from='runs/a/checkpoints/ckpt-5')?"),
    ({"learning_rate": 1e-3}, "learning_rate is the optimizer's: Trainer(optimizer=lambda: "
                              "keras.optimizers.Adam(learning_rate=...))"),
    ({"gradient_clip_val": 1.0}, "gradient_clip_val is Trainer(clipnorm=...)."),
    ({"batch_size": 32}, "batch_size is an argument of fit(): trainer.fit(..., batch_size=32)."),
    ({"steps": 20}, "steps is an argument of fit(): trainer.fit(..., steps=20), or the run's total: "
                    "Trainer(max_steps=20)."),
    ({"foo": 1}, "Fix: Trainer() takes its own arguments and the fields of TrainerConfig"),
])
def test_a_keyword_the_trainer_lacks_names_the_one_meant_before_any_work(options, said):
    built = []
    message = refused(lambda: make(built, **options), said)
    assert "dataclasses" not in message and not built  # no model was built


@pytest.mark.parametrize("callback, said", [
    (lambda: keras.callbacks.EarlyStopping(monitor="val_loss"),  # Keras' patience=0 is not the Trainer's default
     "Trainer(callbacks=[EarlyStopping(monitor='loss', patience=0)], eval_every=<the steps of one epoch>) (from "
     "trainer import EarlyStopping)"),
    (lambda: keras.callbacks.ReduceLROnPlateau(monitor="val_loss"),
     "Trainer(callbacks=[ReduceLROnPlateau(monitor='loss', patience=10)], eval_every=<the steps of one epoch>) (from "
     "trainer import ReduceLROnPlateau)"),
    (lambda: keras.callbacks.ModelCheckpoint("best.keras"), "Trainer(best_metric=..., best_mode=..., keep_best=...)"),
    (lambda: keras.callbacks.TensorBoard(), "Trainer(run_dir=...) writes TensorBoard files"),
    (lambda: keras.callbacks.CSVLogger("log.csv"), "Trainer(loggers=[MetricsWriter(), CSVLogger(path)])"),
    (lambda: keras.callbacks.LambdaCallback(), "Fix: write your own: subclass trainer.Callback"),
])
def test_a_keras_callback_is_refused_at_construction_naming_the_trainers_way(tmp_path, callback, said):
    """It was taken, then fit() failed on `'ReduceLROnPlateau' object has no attribute 'state_dict'`."""
    built = []
    refused(lambda: make(built, callbacks=[callback()], run_dir=tmp_path / "run"),
            "is a Keras callback, which the Trainer's loop does not call", said)
    refused(lambda: make(loggers=[callback()]), "Trainer(loggers=...): keras.callbacks.", said)
    assert not built and not (tmp_path / "run").exists()  # nothing built, no run folder (nor its lock)



class MyCallback(keras.callbacks.Callback):
    pass


def test_a_keras_callbacks_fix_is_true_the_trainers_call_with_its_settings_and_a_users_class_by_its_module():
    """The fix said 'with Keras' arguments' and the Trainer's EarlyStopping then refused restore_best_weights; a user's
    class was named keras.callbacks.MyCallback. Keras' names mean Keras' values: val_accuracy is the Trainer's
    accuracy, an epoch is eval_every's steps."""
    keras_stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=2, min_delta=0.01,
                                               restore_best_weights=True, start_from_epoch=3)
    message = refused(lambda: make(callbacks=[keras_stop]), "is a Keras callback")
    call = "EarlyStopping(monitor='accuracy', patience=2, min_delta=0.01, start_from_step=<3 x the steps of one epoch>)"
    assert (f"Fix: the Trainer's own, with this callback's settings: Trainer(callbacks=[{call}], eval_every=<the steps "
            "of one epoch>) (from trainer import EarlyStopping). Keras' monitor 'val_accuracy' is the Trainer's "
            "'accuracy' (an eval result); its patience counts evaluations, where Keras' count epochs, and fit() "
            "evaluates only at its end by default") in message, message
    assert ("Its restore_best_weights=True: the Trainer keeps the best weights as a checkpoint: Trainer(run_dir=..., "
            "best_metric='accuracy', best_mode='max')") in message
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, min_lr=1e-5)
    call = "ReduceLROnPlateau(monitor='loss', patience=1, factor=0.5, min_lr=1e-05)"
    refused(lambda: make(callbacks=[plateau]), f"Trainer(callbacks=[{call}], eval_every=",
            "patience and cooldown count")
    assert eval(call, {"ReduceLROnPlateau": ReduceLROnPlateau}).factor == 0.5  # a call the Trainer takes
    refused(lambda: make(callbacks=[MyCallback()]), f"Trainer(callbacks=...): {__name__}.MyCallback (a subclass of "
                                                    "keras.callbacks.Callback) is a Keras callback",
            "Fix: write your own: subclass trainer.Callback")


def test_keras_training_loss_monitor_is_the_trainers_train_loss_and_its_best_weights_an_eval_result():
    """Keras' monitor='loss' is the training loss: it was copied as the Trainer's 'loss', the eval loss."""
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)
    refused(lambda: make(callbacks=[stop]),
            "Trainer(callbacks=[EarlyStopping(monitor='train/loss', patience=1)], log_every=<the steps of one epoch>)",
            "its patience counts train-log windows (log_every steps), not evaluations",
            "Its restore_best_weights=True: the best checkpoint is ranked by an eval result, not a train log "
            "(train/loss); with eval data, the eval 'loss': the Trainer keeps the best weights as a checkpoint: "
            "Trainer(run_dir=..., best_metric='loss', best_mode='min')")
    refused(lambda: EarlyStopping(monitor="train/loss", restore_best_weights=True),  # the Trainer's own, given it
            "the best checkpoint is ranked by an eval result, not a train log (train/loss); with eval data, the eval "
            "'loss': the Trainer keeps the best weights as a checkpoint: Trainer(run_dir=..., best_metric='loss'")


def stopping_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * rng.normal(size=96) > 0).astype("int32")
    x_val = rng.normal(size=(32, 4)).astype("float32")
    return x, y, (x_val, (x_val[:, 1] > 0).astype("int32"))  # another rule: the val loss soon stops improving


def stopping_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


@pytest.mark.parametrize("monitor, every", [("val_loss", "eval_every"), ("loss", "log_every")])
def test_the_call_fit_names_for_keras_early_stopping_stops_at_keras_epoch(monitor, every):
    """Given to fit() (Keras' place), the epoch is known: the call names its steps, and it stops where Keras does.
    Keras' min_delta is negative after its fit (Keras 3 flips it in min mode): the call takes its size."""
    x, y, validation = stopping_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=1, min_delta=0.001)
    model = stopping_model()
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss=loss)
    epochs = len(model.fit(x, y, batch_size=16, epochs=40, shuffle=False, validation_data=validation,
                           callbacks=[stop], verbose=0).history["loss"])
    assert stop.min_delta == -0.001 and 1 < epochs < 40
    fit = dict(batch_size=16, epochs=40, shuffle=False, validation_data=validation)
    trainer = lambda **given: Trainer(model=stopping_model, loss=loss,  # noqa: E731
                                      optimizer=lambda: keras.optimizers.SGD(0.3), progress_bar=False, **given)
    message = refused(lambda: trainer().fit(x, y, callbacks=[stop], **fit), "fit(callbacks=...): keras.callbacks.")
    call = re.search(r"Trainer\((callbacks=\[EarlyStopping\(.*?\)\], \w+=\d+)\)", message).group(1)
    assert "min_delta=0.001" in call and call.endswith(f"{every}=6"), call  # 96 examples // 16
    given = eval(f"dict({call})", {"EarlyStopping": EarlyStopping})
    trainer(**given).fit(x, y, **fit)
    assert given["callbacks"][0].stopped_step == 6 * epochs


def test_fit_takes_keras_empty_callbacks_and_refuses_the_trainers_there_naming_trainer_callbacks():
    make().fit(blobs(), steps=2, callbacks=[])  # Keras' default: none
    refused(lambda: make().fit(blobs(), steps=2, callbacks=[EarlyStopping()]),
            "fit(callbacks=...): the Trainer takes its callbacks once, for every fit() call. Fix: "
            "Trainer(callbacks=[...]).")


def test_one_callback_alone_is_taken_as_a_list_of_one_and_what_is_no_callback_is_refused():
    stop = EarlyStopping(monitor="loss", patience=0, min_delta=100.0)  # the second evaluation stops the run
    logs = make(callbacks=stop, eval_every=5, log_every=5).fit(blobs(), blobs(64), steps=40)
    assert logs["step"] == 10 and stop.stopped_step == 10
    refused(lambda: make(callbacks=EarlyStopping), "EarlyStopping is a class. Fix: give an instance: "
                                                   "EarlyStopping(...)")
    refused(lambda: make(callbacks=["early_stopping"]), "takes the Trainer's callbacks (trainer.Callback, a list of "
                                                        "them or one), not 'early_stopping'")


@pytest.mark.parametrize("call, said", [
    (lambda: EarlyStopping(monitor=5), "EarlyStopping(monitor=5): monitor names a value as a string"),
    (lambda: EarlyStopping(monitor="val_loss", restore_best_weights=True),
     "Trainer(run_dir=..., best_metric='val_loss', best_mode='min') keeps them in run_dir/checkpoints/best/; after "
     "fit(), warm_start(trainer.model, '<run_dir>/checkpoints/best')"),
    (lambda: EarlyStopping(monitor="val_accuracy", restore_best_weights=True), "best_mode='max'"),
    (lambda: EarlyStopping(verbose=1), "EarlyStopping logs when it stops, always"),
    (lambda: ReduceLROnPlateau(verbose=1), "ReduceLROnPlateau logs each time it lowers the learning rate, always"),
    (lambda: EarlyStopping(start_from_epoch=2), "Fix: did you mean EarlyStopping(start_from_step=<a step>)? It "
                                                "counts steps"),
    (lambda: EarlyStopping(patiense=2), "Fix: did you mean EarlyStopping(patience=2)?"),
    (lambda: ReduceLROnPlateau(epsilon=1e-3), "Fix: did you mean ReduceLROnPlateau(min_delta=0.001)?"),
    (lambda: EarlyStopping(foo=1), "Fix: give EarlyStopping() its own arguments: monitor, mode, patience"),
])
def test_keras_arguments_of_the_monitors_name_the_trainers_way(call, said):
    refused(call, said)


def test_the_way_restore_best_weights_names_loads_the_best_weights(tmp_path):
    """What the error says to do instead does it: the best checkpoint's weights, put into the model by warm_start,
    evaluate to best.json's value."""
    trainer = make(run_dir=tmp_path, best_metric="val_loss", best_mode="min", eval_every=5, log_every=5)
    eval_data = blobs(64)
    trainer.fit(blobs(), eval_data, steps=30)
    best = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())[0]
    warm_start(trainer.model, tmp_path / "checkpoints" / "best")
    assert trainer.evaluate(eval_data)["loss"] == pytest.approx(best["loss"], rel=1e-5)


@pytest.mark.parametrize("args, said", [
    (["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val_loss",
      "callbacks.early_stopping.restore_best_weights=true"],
     "callbacks.early_stopping has no key 'restore_best_weights'. Fix: the best weights are kept as a checkpoint: "
     "trainer.best_metric=val_loss trainer.best_mode=min (max if a larger val_loss is better) keeps them"),
    (["callbacks=[early_stopping]", "callbacks.early_stopping.mode=max",
      "callbacks.early_stopping.restore_best_weights=true"], "trainer.best_metric=loss trainer.best_mode=max keeps"),
    (["callbacks=[early_stopping]", "callbacks.early_stopping.verbose=1"], "trainer.verbose=false quiets the console"),
    (["callbacks=[early_stopping]", "callbacks.early_stopping.start_from_epoch=2"],
     "Fix: did you mean callbacks.early_stopping.start_from_step=<a step>?"),
    (["callbacks=[reduce_lr_on_plateau]", "callbacks.reduce_lr_on_plateau.epsilon=0.01"],
     "Fix: did you mean callbacks.reduce_lr_on_plateau.min_delta=0.01?"),
    (["trainer.eval_freq=5"], "Fix: did you mean trainer.eval_every=5?"),
    (["trainer.steps=5"], "Fix: did you mean trainer.max_steps=5?"),
])
def test_from_the_cli_the_same_names_get_the_overrides_meant(args, said):
    from trainer.argv_check import problem_in

    problem = problem_in(args)
    assert problem is not None and said in problem and "Trainer(" not in problem, problem
