"""Config validation: bad keys, types and options fail before any work, naming the problem."""
import hashlib

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.nonexistent=1", "trainer.nonexistent"),
        ("trainer.max_steps=abc", "max_steps"),
        ("recipe=nope", "recipe=nope: no recipe named 'nope'. Fix: choose from gan, mnist, resnet,"),
        ("precision=float8", "precision=float8: no precision named 'float8'"),
        ("data.bogus=1", "data.bogus"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, override, expected):
    run_dir = tmp_path / "run"
    result = run_cli(override, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr + result.stdout
    assert not run_dir.exists(), "no run folder may be left by a config error"


def test_failed_run_leaves_existing_checkpoints_untouched(tmp_path, tiny):
    run_dir = tmp_path / "run"
    ok = run_cli(*tiny, f"hydra.run.dir={run_dir}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "checkpoints").iterdir()
              if p.is_file()}
    assert any(name.endswith(".index") for name in before)

    bad = run_cli(*tiny, f"hydra.run.dir={run_dir}", "trainer.nonexistent=1")
    assert bad.returncode != 0
    refused = run_cli(*tiny, f"hydra.run.dir={run_dir}", "trainer.resume=false")
    assert refused.returncode != 0
    assert "refusing to overwrite" in refused.stderr + refused.stdout

    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "checkpoints").iterdir()
             if p.is_file()}
    assert after == before


def test_cfg_job_prints_composed_config():
    result = run_cli("--cfg", "job", "optimizer=sgd", "optimizer.lr=0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "_target_: keras.optimizers.SGD" in result.stdout
    assert "lr: 0.05" in result.stdout
    assert "max_steps: 1500" in result.stdout


def test_bad_data_path_is_a_clear_error_with_exit_2(tmp_path):
    result = run_cli("data.name=mnist", f"data.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "data.path=" in result.stdout + result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=0", "data.batch_size=0 is out of range: must be >= 1"),
        ("optimizer.schedule=nope", "optimizer.schedule='nope' is not one of"),
        ("strategy=one_device strategy.device=/gpu:7", "strategy.device='/gpu:7': this machine has"),
        # MirroredStrategy over absent GPUs waited forever at its first step, deaf to SIGTERM; over one, it used the CPU
        ("strategy=mirrored strategy.devices=[GPU:0,GPU:1]",
         "strategy.devices=[GPU:0,GPU:1] ('GPU:0'): this machine has 0 GPU device(s) ([]) (no GPU is visible to"),
        ("strategy=mirrored strategy.devices=[/gpu:0]", "Fix: drop strategy.devices (the GPUs, else the CPU; "
                                                       "strategy.logical_cpus=N splits the CPU"),
        # a field of another strategy (strategy.logical_cpus=2 alone ran 1 replica): the same check
        ("strategy.devices=[/cpu:0]", "strategy=default strategy.devices=[/cpu:0]: devices is a field of the mirrored "
                                      "strategy, and the default strategy (one device) would ignore it. Fix: "
                                      "strategy=mirrored strategy.devices=[/cpu:0]."),
    ],
)
def test_bad_values_exit_2_naming_the_key_without_a_traceback(tmp_path, override, expected):
    result = run_cli(*override.split(), "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert expected in result.stdout + result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5: trainer.max_steps takes an integer (or null), not 1.5. Fix: give "
                              "trainer.max_steps an integer."),
    ("trainer.resume=maybe", "trainer.resume=maybe: trainer.resume takes true or false, not 'maybe'."),
    # A recipe's sections: their schema depends on the groups chosen (the config is composed once to check).
    ("optimizer.lr=abc", "optimizer.lr=abc: optimizer.lr takes a number, not 'abc'. Fix: give optimizer.lr a number."),
    ("data.batch_size=1.5", "data.batch_size=1.5: data.batch_size takes an integer, not '1.5'."),
    ("model.hidden_units=[64,abc]", "model.hidden_units=[64,abc]: model.hidden_units takes a list, and its "
                                    "element 'abc' is not an integer. Fix: make every element of "
                                    "model.hidden_units an integer."),
    ("model.widht=3", "model.widht=3: model has no key 'widht'. Fix: use one of its keys: (kind, hidden_units, "),
    ("trainer.max_stepz=10", "trainer.max_stepz=10: trainer has no key 'max_stepz'. Fix: did "
                             "you mean trainer.max_steps"),
])
def test_a_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, override, expected):
    result = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and expected in out and "full_key" not in out, out[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    # An option a config group lacks: its options, without the base_* schemas stored beside them, and the one meant.
    (["recipe=nonexistent"], "recipe=nonexistent: no recipe named 'nonexistent'. Fix: choose from gan, mnist, resnet, "
                             "resnet_finetune, transformer (conf/recipe/*.yaml)."),
    (["precision=bf16"], "precision=bf16: no precision named 'bf16'. Fix: did you mean precision=mixed_bfloat16? Or "
                         "choose from auto, float32, mixed_bfloat16, mixed_float16 (conf/precision/*.yaml)."),
    (["optimizer=adamm"], "optimizer=adamm: no optimizer named 'adamm'. Fix: did you mean optimizer=adam? Or choose "
                          "from adam, adamw, sgd (conf/optimizer/*.yaml)."),
    (["strategy=ddp"], "Fix: did you mean strategy=mirrored?"),  # Lightning's name
    # A section's key at the top: Hydra said to add it with +, which nothing would read.
    (["max_steps=5"], "max_steps=5: max_steps is not a top-level key. Fix: did you mean trainer.max_steps=5?"),
    (["recipe=resnet", "batch_size=64"], "batch_size=64: batch_size is not a top-level key. Fix: did you mean "
                                         "data.batch_size=64?"),
    (["trainr.max_steps=5"], "trainr is not a top-level key. Fix: did you mean trainer.max_steps=5?"),
    # Keras' and Lightning's names for this config's keys.
    (["optimizer.learning_rate=1e-3"], "optimizer.learning_rate=1e-3: optimizer has no key 'learning_rate'. Fix: did "
                                       "you mean optimizer.lr=1e-3? (lr, clipnorm,"),
    (["trainer.max_epochs=3"], "trainer.max_epochs=3: trainer has no key 'max_epochs'. Fix: did you mean "
                               "trainer.epochs=3?"),
    (["trainer.learning_rate=0.1"], "Fix: did you mean optimizer.lr=0.1?"),
    (["callbacks.early_stopping.patience=5"], "callbacks.early_stopping.patience=5: callbacks=early_stopping is not "
                                              "chosen, so callbacks.early_stopping has no options to set. Fix: choose "
                                              "it in the same command: callbacks=[early_stopping]"),
    # A sweep: each choice of a group; the first job of a sweep of keys.
    (["-m", "precision=float32,bf16"], "Fix: did you mean precision=float32,mixed_bfloat16?"),
    (["-m", "max_steps=5,10"], "max_steps is not a top-level key. Fix: did you mean trainer.max_steps=5,10?"),
    # Hydra's grammar, a list group deleted, a recipe's keys the option chosen lacks: exit 1 in Hydra's words.
    (["trainer.max_steps"], "trainer.max_steps: an override is key=value. Fix: give it a value: "
                            "trainer.max_steps=VALUE."),
    (["logger=[jsonl"], "logger=[jsonl: Hydra cannot read it (no viable alternative at input '[jsonl'). Fix: "
                        "key=value,"),
    (["~logger"], "~logger: logger is a list of options, which Hydra cannot delete. Fix: logger=[] (none of them)."),
    (["recipe=resnet", "optimizer=adam"], "optimizer=adam: recipe/resnet sets optimizer.momentum, a key optimizer=adam "
                                          "lacks (AdamConfig). Fix: keep the recipe's optimizer=sgd,"),
    # Each value of a sweep of keys is checked before the first job (job 1 failed with a traceback).
    (["-m", "trainer.max_steps=2,-1"], "trainer.max_steps=2,-1: the job with trainer.max_steps=-1: "),
    (["-m", "data.batch_size=32,abc"], "data.batch_size=32,abc: data.batch_size takes an integer, not 'abc'."),
    (["precision=null"], "precision=null: precision takes one of its options, not null. Fix: choose from auto,"),
    (["seed=abc"], "seed=abc: seed takes an integer, not 'abc'. Fix: give seed an integer."),
    (["-m", "optimizer.learning_rate=1e-3,1e-4"], "optimizer.learning_rate=1e-3,1e-4: optimizer has no key "
                                                  "'learning_rate'. Fix: did you mean optimizer.lr=1e-3,1e-4?"),
])
def test_config_mistakes_hydra_reported_are_one_line_naming_the_fix(tmp_path, args, expected):
    """Hydra's own text for these spans several lines (its options list the base_* schemas), exits 1, and for
    `max_steps=5` suggests `+max_steps=5`, which nothing reads."""
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "base_" not in result.stderr and not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, expected", [
    # A key's override is blamed, not the group choice before it (the longest key matching the error's path).
    ("optimizer=sgd optimizer.learning_rate=0.1", "optimizer.learning_rate=0.1: optimizer has no key 'learning_rate'. "
                                                  "Fix: did you mean optimizer.lr=0.1?"),
    ("optimizer=sgd optimizer.lr=abc", "optimizer.lr=abc: optimizer.lr takes a number, not 'abc'."),
    ("model=mnist_cnn model.widht=3", "model.widht=3: model has no key 'widht'."),
    ("data=synthetic data.batch_size=abc", "data.batch_size=abc: data.batch_size takes an integer, not 'abc'."),
    ("callbacks=[early_stopping] callbacks.early_stopping.patiense=5",
     "callbacks.early_stopping.patiense=5: callbacks.early_stopping has no key 'patiense'. Fix: did you mean "
     "callbacks.early_stopping.patience=5?"),
    ("-m optimizer=adam,sgd optimizer.learning_rate=0.1", "optimizer.learning_rate=0.1: optimizer has no key "
                                                          "'learning_rate'. Fix: did you mean optimizer.lr=0.1?"),
    # A key of another option of the group: that option, not a similar name that silently does nothing.
    ("optimizer.momentum=0.9", "optimizer.momentum=0.9: optimizer.momentum is a key of optimizer=sgd, not of the "
                               "optimizer chosen. Fix: did you mean optimizer=sgd optimizer.momentum=0.9?"),
    ("optimizer.weight_decay=0.1", "Fix: did you mean optimizer=adamw optimizer.weight_decay=0.1?"),
    ("optimizer.name=sgd", "optimizer.name=sgd: optimizer has no key 'name'. Fix: did you mean optimizer=sgd?"),
    ("trainer.ckpt_path=x", "Fix: did you mean trainer.resume_from=x?"),  # Lightning's fit(ckpt_path=)
    ("trainer.precision=bf16-mixed", "Fix: did you mean precision=mixed_bfloat16?"),  # the value translated too
    # Spellings only in the key's own section: no data.path for model.depth.
    ("recipe=resnet model.depth=20", "model.depth=20: model has no key 'depth'. Fix: use one of its keys:"),
    ("model.arch=x", "model.arch=x: model has no key 'arch'. Fix: use one of its keys:"),
    # A callback not chosen: the callbacks chosen (none here; resnet's finetune is the recipe's, not the group's).
    ("recipe=resnet callbacks.early_stopping.patience=5",
     "Fix: choose it in the same command: callbacks=[early_stopping] callbacks.early_stopping.patience=5"),
    ("callbacks=[reduce_lr_on_plateau] callbacks.early_stopping.patience=5",
     "Fix: choose it in the same command: callbacks=[reduce_lr_on_plateau,early_stopping] "
     "callbacks.early_stopping.patience=5"),
    ("callbacks.early_stoping.patience=5",
     "callbacks.early_stoping.patience=5: callbacks has no entry 'early_stoping'. Fix: did you mean "
     "callbacks=[early_stopping] callbacks.early_stopping.patience=5?"),
    # A free-form section: a new entry takes + (docs/training-control.md).
    ("eval_sets.ood.path=x", "eval_sets.ood.path=x: eval_sets.ood is a new entry of eval_sets. Fix: add it with +: "
                             "+eval_sets.ood.path=x"),
])
def test_a_mistake_is_blamed_on_its_override_with_the_fix_meant(args, expected):
    import shlex

    from trainer.argv_check import problem_in

    problem = problem_in(shlex.split(args))
    assert problem is not None and expected in problem and len(problem.splitlines()) == 1, problem
    assert expected.startswith("Fix") or problem.startswith(expected), problem  # the override blamed comes first
    assert "data.path" not in problem and "ema_momentum=" not in problem


@pytest.mark.parametrize("args, expected", [
    (["--max_steps", "5"], "--max_steps 5: Hydra overrides have no dashes. Fix: did you mean trainer.max_steps=5?"),
    (["--trainer.max_steps=5"], "--trainer.max_steps=5: Hydra overrides have no dashes. Fix: did you mean "
                                "trainer.max_steps=5?"),
    (["--fast_dev_run"], "Fix: did you mean trainer.fast_dev_run=true?"),
])
def test_argparse_style_flags_name_the_override_meant(args, expected):
    """Hydra answered them with 8 lines of argparse usage naming __main__.py."""
    from trainer.argv_check import problem_in

    assert expected in problem_in(args)
    assert problem_in(["--cfg", "job", "--resolve", "trainer.max_steps=5"]) is None  # Hydra's own flags


@pytest.mark.parametrize("args, fix", [
    (["recipe=mnist", "--set-auto"], "python -m trainer.doctor recipe=mnist --verify --set-auto"),  # --verify needed
    (["--verify", "50", "recipe=mnist", "model.hidden_units=[8]", "--quick"],
     "python -m trainer.doctor recipe=mnist 'model.hidden_units=[8]' --verify 50 --quick"),
    (["recipe=mnist", "--min", "1e-5", "--max=1"], "python -m trainer.lr_find recipe=mnist --min 1e-5 --max=1"),
])
def test_a_flag_of_the_doctor_or_lr_find_names_that_commands_line_which_works(args, fix):
    """It said "did you mean set-auto=true?", and that said "set-auto is not a key". The flags are read from the
    commands' own parsers; the command line given parses there."""
    import shlex

    from trainer import lr_find
    from trainer.argv_check import problem_in
    from trainer.doctor import __main__ as doctor

    problem = problem_in(args)
    said = f", not of python -m trainer (its arguments are Hydra overrides, key=value). Fix: {fix}."
    assert problem.endswith(said), problem
    assert "=true" not in problem
    words = shlex.split(fix)
    parsed = (doctor if words[2] == "trainer.doctor" else lr_find).parse_args(words[3:])
    assert parsed.overrides == [a for a in args if "=" in a and not a.startswith("-")]


@pytest.mark.parametrize("args, expected", [
    (["--steps", "5"], "--steps 5: a flag of python -m trainer.lr_find, not of python -m trainer (its arguments are "
                       "Hydra overrides, key=value). Fix: did you mean trainer.max_steps=5? Or python -m "
                       "trainer.lr_find --steps 5."),
    (["--out", "x"], "Fix: hydra.run.dir=x (this command's run folder), or python -m trainer.doctor --out x, or "
                     "python -m trainer.lr_find --out x."),
    (["--foo", "3"], "--foo 3: Hydra overrides have no dashes, and as one, foo=3: foo is not a key of the run's "
                     "config"),
])
def test_a_dashed_word_that_is_no_key_is_not_told_to_become_one(args, expected):
    from trainer.argv_check import problem_in

    problem = problem_in(args)
    assert expected in problem and "did you mean foo=3" not in problem, problem


@pytest.mark.parametrize("args", [["-sc", "install=bash"], ["-sc", "query=trainer.max"],
                                  ["--shell-completion", "install=bash"]])
def test_hydra_shell_completion_is_not_checked_as_overrides(args):
    from trainer.argv_check import problem_in

    assert problem_in(args) is None


def test_shell_completion_installs(tmp_path):
    result = run_cli("-sc", "install=bash")
    assert result.returncode == 0 and "complete" in result.stdout, result.stderr[-2000:]


def test_options_from_another_config_dir_are_left_to_hydra(tmp_path):
    """--config-dir adds options to the groups (a recipe of the user's): the check does not refuse them."""
    import importlib.resources
    import shutil

    (tmp_path / "recipe").mkdir()
    mnist = importlib.resources.files("trainer.conf") / "recipe" / "mnist.yaml"
    shutil.copy(str(mnist), tmp_path / "recipe" / "mine.yaml")
    result = run_cli("--config-dir", str(tmp_path), "recipe=mine", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainer.recipes.mnist.build_model" in result.stdout


def test_adamw_excludes_names_from_weight_decay():
    import keras

    from trainer.optim import build_optimizer

    opt = build_optimizer(
        {"_target_": "keras.optimizers.AdamW", "lr": 1e-3, "weight_decay": 0.1, "exclude_from_weight_decay": ["bias"]},
        100
    )
    kernel, bias = keras.Variable([[1.0]], name="kernel"), keras.Variable([1.0], name="bias")
    opt.build([kernel, bias])
    opt.apply([keras.ops.zeros((1, 1)), keras.ops.zeros((1,))], [kernel, bias])
    assert float(bias.numpy()[0]) == 1.0  # excluded: no decay
    assert float(kernel.numpy()[0, 0]) < 1.0  # decayed


@pytest.mark.parametrize("field, value", [("grad_accum_steps", 2.5), ("steps_per_loop", 2.5), ("max_steps", "5"),
                                          ("log_every", True), ("profile_steps", [1, 2.5])])
def test_every_int_field_takes_only_whole_numbers(field, value):
    """One check for every int field of a schema (Python gives it no type check): the ranges alone let 2.5 pass."""
    from trainer.config import ConfigError, TrainerConfig

    with pytest.raises(ConfigError, match=rf"Trainer\({field}=.*\) is not a whole number"):
        TrainerConfig(**{field: value})


def test_numpy_integers_are_whole_numbers():
    import numpy as np

    from trainer.config import TrainerConfig

    config = TrainerConfig(grad_accum_steps=np.int64(2), max_steps=np.int32(5), profile_steps=[1, 2])
    assert config.grad_accum_steps == 2


@pytest.mark.parametrize("args", [
    '+foo=1',
    '++seed=3',
    '~trainer.init_from',
    'trainer.max_steps=null trainer.epochs=2',
    "recipe=resnet_finetune trainer.init_from=runs/pretrain 'data.classes=[5,6,7,8,9]' data.num_classes=5",
    "'hydra.run.dir=runs/a b'",
    '\'hydra.run.dir="runs/a,b=c"\'',
    "'model.hidden_units=[64,32]' '+data.extra={a: 1, b: 2}'",
    "'seed=${oc.env:SEED,1}'",
    'hydra.job.chdir=true',
    'hydra/launcher=joblib',
    "hydra/sweeper=optuna 'hydra.sweeper.params={optimizer.lr:interval(1e-4,1e-2)}' -m",
    "-m 'seed=range(1,3)'",
    "-m 'optimizer.lr=choice(1e-3,1e-4)'",
    "-m 'optimizer=glob(ad*)'",
    "-m 'optimizer.lr=interval(1e-4,1e-2)' hydra/sweeper=optuna",
    '--cfg job',
    '--info',
    '-cn config trainer.max_steps=5',
    '--config-dir /tmp/elsewhere foo.bar=1',
    '-sc query=trainer.max',
    'recipe=resnet precision=mixed_bfloat16',
    "'callbacks=[early_stopping]' callbacks.early_stopping.patience=5",
    "callbacks.early_stopping.patience=5 'callbacks=[early_stopping]'",
    'logger=[]',
    "'logger=[jsonl,csv]'",
    'optimizer=sgd optimizer.momentum=0.9',
    'optimizer=adamw optimizer.weight_decay=0.01',
    '--multi seed=1,2',
    '--reso --cfg job',
    '--pack trainer --cfg job',
    '--config-n config --cfg job',
    '--hydra-h',
    '--vers',
])
def test_valid_commands_pass_the_check(args):
    """What Hydra runs (flags abbreviated as argparse allows, +/++/~, quoted values, sweeps, other configs) is
    not refused before it runs."""
    import shlex

    from trainer.argv_check import problem_in

    assert problem_in(shlex.split(args)) is None


@pytest.mark.parametrize("args, expected", [
    (["logger=[null]"], "logger=[null]: logger takes one of its options, not null. Fix: choose from"),
    (["-m", "logger=[jsonl],[null]"], "or none: logger=[]."),
    (["seed=null"], "seed=null: seed takes an integer, not null. Fix: give seed an integer: seed=0."),
    (["--config-d", "/x", "--max_steps", "5"], "--max_steps 5: Hydra overrides have no dashes."),
    (["--multi", "seed=1,2", "--cfg", "job"], "--multirun --cfg: Hydra does one of --run, --multirun (-m), --cfg, "
                                              "--info and --shell-completion at a time. Fix: keep one of them"),
])
def test_nulls_and_abbreviated_flags_are_named(args, expected):
    """Hydra's TypeError traceback for a null in a list, its ValueError for two commands; OmegaConf's "is not
    Optional" without a fix."""
    from trainer.argv_check import problem_in

    assert expected in problem_in(args)
