"""An error's fix is in the form its user came from: the Python argument (`Trainer(best_metric=...)`) for a
Trainer built in Python, the override (`trainer.best_metric=...`) from `python -m trainer`; not the other's, nor
both. Tiny models through the public API; two CLI runs in process."""
from __future__ import annotations

import re

import pytest

from conftest import TINY, blobs, run_cli
from conftest import tiny_classifier as classifier


def fit(trainer, steps=5, eval_data=True):
    return trainer.fit(blobs(), blobs(64) if eval_data else None, steps=steps)


def early_stopping(**options):
    from trainer import EarlyStopping

    return EarlyStopping(**options)


PYTHON_CASES = [
    (lambda tmp: classifier(max_steps=-1), "Fix: give Trainer(max_steps=...) a value in [1, "),
    (lambda tmp: classifier(on_divergence="retry"), "Fix: give Trainer(on_divergence=...) one of them."),
    (lambda tmp: classifier(fast_dev_run=-1), "Fix: Trainer(fast_dev_run=True) (2 train steps and 2 eval batches)"),
    (lambda tmp: classifier(profile_steps=[5, 2]), "Fix: e.g. Trainer(profile_steps=[10, 20])"),
    (lambda tmp: early_stopping(patience=-1), "Fix: give EarlyStopping(patience=...) a value >= 0."),
    (lambda tmp: fit(classifier(), steps=-3), "Fix: give fit(steps=...) a value in [1, "),
    (lambda tmp: fit(classifier(run_dir=tmp, best_metric="acc")),
     "Fix: Trainer(best_metric=<one of them>) (a metric's name is its `name=`), or Trainer(best_metric=None) to keep"),
    (lambda tmp: fit(classifier([early_stopping(monitor="acc")])), "Fix: EarlyStopping(monitor=<one of them>): "),
    (lambda tmp: fit(classifier([early_stopping(monitor="train/examples_per_sec")])),
     "Fix: EarlyStopping(mode='min') or EarlyStopping(mode='max')."),
    (lambda tmp: fit(classifier(run_dir=tmp, resume_from="ckpt-5", resume=False)), "Fix: drop Trainer(resume=False)."),
    (lambda tmp: classifier().fit(blobs(), epochs=0.001), "Fix: at least fit(epochs="),
]


@pytest.mark.parametrize("case", range(len(PYTHON_CASES)))
def test_from_python_the_fix_names_the_python_argument(tmp_path, case):
    from trainer.errors import UserError

    make, fix = PYTHON_CASES[case]
    with pytest.raises(UserError) as raised:
        make(tmp_path / "run")
    said = str(raised.value)
    assert fix in said, said
    lead, after = said.split("Fix:", 1)
    assert "set trainer." not in after and "from the CLI" not in after and "=null" not in after, said
    # the lead-in names the setting as given too: Trainer(best_metric='acc'), not trainer.best_metric='acc'
    assert not re.search(r"\b(trainer|callbacks\.\w+)\.\w+=", lead), said
    assert re.match(r"(Trainer|EarlyStopping|fit)\(\w+=", lead), said


def test_from_python_the_warning_that_early_stopping_cannot_act_names_the_argument(caplog):
    with caplog.at_level("WARNING", logger="trainer"):
        fit(classifier([early_stopping()], eval_every=500), steps=20)
    assert "Fix: Trainer(eval_every=4) (or less), or a smaller patience." in caplog.text, caplog.text


@pytest.mark.parametrize("overrides, fix, python", [
    (["trainer.best_metric=acc"],
     "Fix: trainer.best_metric=<one of them> (a metric's name is its `name=`), or trainer.best_metric=null to keep",
     "Trainer(best_metric"),
    (["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=train/examples_per_sec"],
     "Fix: callbacks.early_stopping.mode=min or callbacks.early_stopping.mode=max.", "EarlyStopping(mode"),
    # the group's option (precision=bf16) and its key (precision.policy=bf16) are told the policy meant alike
    (["precision.policy=bf16"], "precision.policy='bf16' is not one of float32|mixed_float16|mixed_bfloat16|auto. "
     "Fix: did you mean precision.policy=mixed_bfloat16? Else set precision.policy to one of them.",
     "Trainer(precision"),
    # a dry run has no run folder: the two settings, not Trainer(run_dir=...), which a command cannot give
    (["trainer.fast_dev_run=true", "trainer.resume_from=ckpt-2"], "trainer.resume_from=ckpt-2 and "
     "trainer.fast_dev_run=true: a dry run reads no run folder, and resume_from names a checkpoint of one. Fix: drop "
     "one of them.", "Trainer(run_dir"),
])
def test_from_the_cli_the_fix_names_the_override(tmp_path, overrides, fix, python):
    result = run_cli(*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert fix in output and python not in output and "Traceback" not in output, output[-3000:]


def test_from_python_a_value_out_of_its_choices_is_told_the_one_meant_in_the_python_form():
    from trainer import TrainerConfig
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        classifier(best_mode="minimum")
    assert str(raised.value) == ("Trainer(best_mode='minimum') is not one of auto|max|min. Fix: did you mean "
                                 "Trainer(best_mode='min')? Else give Trainer(best_mode=...) one of them.")
    with pytest.raises(ConfigError, match=r"^Trainer\(limit_eval_batches=3\) and Trainer\(eval_steps=5\) both"):
        TrainerConfig(limit_eval_batches=3, eval_steps=5)
    with pytest.raises(ConfigError, match=r"^precision policy 'bf16' is not one of .*Fix: did you mean "
                                          r"mixed_bfloat16\? From Python: Trainer\(precision=\"mixed_bfloat16\"\)"):
        classifier(precision="bf16")


def test_from_python_resume_from_without_a_run_folder_is_named_in_the_python_form(tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        classifier(run_dir=tmp_path / "run", fast_dev_run=True, resume_from="ckpt-2").fit(blobs(), steps=5)
    assert str(raised.value) == ("Trainer(resume_from='ckpt-2') and Trainer(fast_dev_run=True): a dry run reads no "
                                 "run folder, and resume_from names a checkpoint of one. Fix: drop one of them.")


@pytest.mark.parametrize("typed, meant", [("ture", "True"), ("flase", "False"), ("nul", "None"),
                                          ("mesure", "'measure'")])
def test_from_python_a_choice_spelt_true_false_or_null_is_meant_as_the_python_literal(typed, meant):
    """jit_compile's choices true|false|null are the CLI's spellings: from Python the value meant is the literal
    (True), not the string 'true'."""
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        classifier(jit_compile=typed)
    assert f"Fix: did you mean Trainer(jit_compile={meant})? Else" in str(raised.value), str(raised.value)


def test_the_command_lines_trainers_are_from_the_cli_and_pythons_are_not():
    """`from_cli` is set by the command line's entry points (their Trainers come from assemble.parts_of: python -m
    trainer, the doctor, lr_find, evaluate, predict), not inferred; a Trainer built in Python, or from parts given
    in Python (the doctor's diagnose), is not."""
    from trainer.assemble import compose_config, parts_of

    cfg = compose_config(["recipe=mnist", "data=synthetic"])
    parts = parts_of(cfg, total_steps=10)
    assert parts.from_cli and parts.build().from_cli
    assert not parts.replace(from_cli=False).build().from_cli
    assert not classifier().from_cli
