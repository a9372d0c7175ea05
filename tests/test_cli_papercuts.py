"""Papercuts a new user of the command line hit (a run folder reused, a sweep stopped, entry points' checks, logs
printed twice): each a cheap regression test of the real entry point, in this process, on tiny settings."""
from conftest import TINY, read_metrics, run_cli


def test_a_run_folder_reused_with_another_recipe_names_the_recipes_not_frozen(tmp_path):
    """A CLI user never set Trainer(frozen=...): the checkpoint's misfit is said as the recipe/model the folder's run
    had and this command's, with the fixes (another hydra.run.dir, or that run's recipe)."""
    run = tmp_path / "run"
    assert run_cli(*TINY, "trainer.max_steps=20", "trainer.eval_steps=1", "model.hidden_units=[8]",
                   f"hydra.run.dir={run}").returncode == 0
    result = run_cli("recipe=gan", *TINY, "trainer.max_steps=25", f"hydra.run.dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stdout + result.stderr
    assert "holds a run of recipe=mnist model=mnist_mlp" in err and "this command runs recipe=gan model=gan" in err
    assert "another hydra.run.dir=" in err and "resume that run with recipe=mnist model=mnist_mlp" in err
    assert "frozen=" not in err and "Traceback" not in err
    assert read_metrics(run)[-1]["step"] == 20  # the run folder is left as it was
