"""python -m trainer.doctor [--quick] [--verify [N]] [--set-auto] [--out DIR] [OVERRIDES...] | --run RUN_DIR

Measures the model of a config (the same overrides as `python -m trainer`) or of a trained run (its
.hydra/config.yaml and its latest checkpoint's weights) on this hardware, and says which precision, XLA
setting and batch size to train with. Writes doctor.json and doctor.png (and doctor.txt, the printed
report) to --out (default: runs/doctor/<date_time>, or the run folder with --run).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

IMPORTED = time.monotonic()  # `python -m trainer.doctor` started about now: before TensorFlow and the config load

from trainer.console import log_command_to_stderr
from trainer.doctor.decide import LEAST_SPEEDUP
from trainer.doctor.verify import VERIFY_ROUNDS
from trainer.errors import EXIT_USER_ERROR, UserError, reports_errors  # noqa: F401 - EXIT_USER_ERROR: its name here before
from trainer.quiet import quiet_tensorflow_import, quiet_when_loaded
from trainer.signals import now_kept, stops_on_signals

quiet_when_loaded()  # TensorFlow loads (quietly) only once the arguments are parsed: -h and bad ones answer at once


class DoctorError(UserError, ValueError):
    """Bad arguments: the message says what and how to fix it (exit 2)."""


VERIFY_STEPS = 100  # --verify without N


def _steps(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of steps: give --verify N (e.g. --verify "
                                         f"{VERIFY_STEPS}), or --verify alone for {VERIFY_STEPS}") from None


def _bare_verify(argv: List[str]) -> List[str]:
    """`--verify precision=auto`: argparse would take the override for --verify's N. A config override
    (key=value) after --verify is an override, and --verify is given without N."""
    return [f"--verify={VERIFY_STEPS}" if token == "--verify" and i + 1 < len(argv) and "=" in argv[i + 1]
            and not argv[i + 1].startswith("-") else token for i, token in enumerate(argv)]


# A flag that works only with another: python -m trainer's hint for a doctor flag given to it (argv_check) adds it.
NEEDS = {"--set-auto": "--verify"}


def make_parser() -> argparse.ArgumentParser:
    """The doctor's arguments; python -m trainer reads its flags from here too (trainer/argv_check.py)."""
    parser = argparse.ArgumentParser(prog="python -m trainer.doctor",
                                     description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m trainer (recipe=resnet ...)")
    parser.add_argument("--run", help="a run folder: its config and its latest checkpoint's weights")
    parser.add_argument("--quick", action="store_true",
                        help="the given batch size only, fewer rounds, one numerics batch")
    parser.add_argument("--verify", nargs="?", type=_steps, const=VERIFY_STEPS, metavar="N",
                        help=f"train the recommended and the current configuration N steps each (default "
                             f"{VERIFY_STEPS}), interleaved; the recommendation is withdrawn unless it is faster")
    parser.add_argument("--set-auto", action="store_true",
                        help="store the verified recommendation (precision, XLA) for precision=auto on this machine, "
                             "for runs of this recipe and model config (needs --verify)")
    parser.add_argument("--out", help="folder for doctor.json / doctor.png (default: "
                                      "runs/doctor/<date_time>, or the run folder)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    # options may come between overrides
    args = make_parser().parse_intermixed_args(_bare_verify(sys.argv[1:] if argv is None else list(argv)))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise DoctorError(f"{bad[0]!r} is not a config override (key=value) or an option (--run, --quick, "
                          "--verify, --set-auto, --out)")
    if args.verify is not None and args.verify < VERIFY_ROUNDS:
        raise DoctorError(f"--verify {args.verify}: give at least {VERIFY_ROUNDS} steps (one per interleaved round)")
    if args.set_auto and args.verify is None:  # refused before minutes of measuring that would store nothing
        raise DoctorError("--set-auto stores what --verify measured: add --verify [N]")
    if args.run and args.overrides:
        raise DoctorError("--run takes the run's own config: give either --run RUN_DIR or overrides, not both")
    return args


def _check_overrides(overrides: List[str]) -> None:
    """A config mistake, said as python -m trainer says it (trainer/argv_check.py), before TensorFlow loads."""
    from trainer.argv_check import problem_in

    problem = problem_in(overrides)
    if problem:
        raise DoctorError(problem)


def compose_config(overrides: List[str]):
    """The config `python -m trainer OVERRIDES` would run, checked the same way (trainer.assemble.compose_config)."""
    from trainer.assemble import compose_config

    return compose_config(overrides, error=DoctorError)


def load_run(folder: str) -> Tuple[object, List[str], str, Path]:
    """(config, its overrides, the latest checkpoint, the run folder itself) of a run folder (or of a
    folder or checkpoint inside it), read by trainer.runs as every command reads one."""
    from trainer.runs import RunNotFound, checkpoint_of, not_a_run_folder
    from trainer.sweep_table import recorded_overrides

    try:
        checkpoint = checkpoint_of(folder)
    except RunNotFound:  # its message offers a .keras file: the doctor needs the run's config
        raise not_a_run_folder(folder, takes=", nor its checkpoints/ folder or a ckpt-N prefix",
                               fix="give a run folder; the doctor needs the run's config (a .keras file has none: "
                                   "give its overrides instead of --run)") from None
    overrides = recorded_overrides(checkpoint.run) or []
    return checkpoint.cfg, [o for o in overrides if not o.startswith("hydra.")], checkpoint.prefix, checkpoint.run


def diagnose_config(cfg, overrides: List[str], quick: bool, prefix: Optional[str], command: str,
                    verify_steps: Optional[int] = None) -> dict:
    """The Trainer's parts `python -m trainer` would build (trainer.assemble.parts_of), measured by
    trainer.doctor.diagnose_parts; with a run's checkpoint `prefix`, its weights (trainer.runs.restore_weights)."""
    import keras

    from trainer.assemble import parts_of, strategy_of
    from trainer.auto_precision import model_identity_of
    from trainer.data import build_data, check_batch_size
    from trainer.doctor import _first_batches, diagnose_parts
    from trainer.doctor.model_table import build_under
    from trainer.runs import restore_weights

    strategy = strategy_of(cfg)  # before TensorFlow initializes devices
    batch_size = cfg.data.get("batch_size", 1)
    check_batch_size(batch_size)
    bundles = {}

    def data_for_batch(size: int):
        if size not in bundles:
            bundles[size] = build_data(cfg.data, batch_size=size)
        return bundles[size].train

    parts = parts_of(cfg, total_steps=schedule_steps(cfg))
    weights = None
    if prefix:  # the checkpoint's weights, not its EMA averages: the doctor measures training
        x, _, _ = keras.utils.unpack_x_y_sample_weight(_first_batches(data_for_batch(batch_size), 1)[0])
        model = build_under(parts.model, "float32", x)
        restore_weights(model, prefix)
        weights = model.get_weights()
    return diagnose_parts(parts, data_for_batch, batch_size=batch_size, strategy=strategy, weights=weights,
                          quick=quick, overrides=overrides, command=command, verify_steps=verify_steps,
                          model_identity=model_identity_of(cfg))


def schedule_steps(cfg) -> int:
    """The step count the doctor's optimizers schedule their learning rate over: it trains its own count of
    steps (the grid's calls, --verify N), not the run's trainer.max_steps, so a short run's max_steps (or
    a warmup longer than it) must not warn that the warmup outlasts a run the doctor does not train."""
    warmup = int(cfg.get("optimizer", {}).get("warmup_steps") or 0)
    return max(cfg.trainer.get("max_steps") or 1000, 1000, warmup + 1)


def _out_folder(args, run_folder: Optional[Path]) -> Path:
    if args.out:
        return Path(args.out)
    if run_folder is not None:
        return run_folder
    return Path("runs") / "doctor" / time.strftime("%Y-%m-%d_%H-%M-%S")


def _prepare_out_folder(out: Path) -> None:
    """Creates --out and checks it takes a file before the minutes of measuring, not after."""
    if out.exists() and not out.is_dir():
        raise DoctorError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".doctor-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DoctorError(f"--out {out} cannot be written ({e.strerror or e}); give a folder you "
                          "can write to") from None


def _replaced(model: dict, policy: str, xla: Optional[bool], verdict: str = "faster",
              speedup: Optional[float] = None) -> str:
    """' It replaces ...': the answer stored before for this model, when this one differs from it in policy,
    XLA setting, verdict or speed-up ('' when there was none, or the same)."""
    from trainer.auto_precision import stored_answer

    old = stored_answer(model)
    same_speedup = speedup is None or round(old["speedup"], 2) == round(speedup, 2) if old else True
    if old is None or ((old["policy"], old.get("jit_compile"), old.get("verdict", "faster")) == (policy, xla, verdict)
                       and same_speedup):
        return ""
    xla_part = "" if old.get("jit_compile") is None else f" with XLA {'on' if old['jit_compile'] else 'off'}"
    return (f" It replaces the answer stored for this model on {old.get('when', '?')}: {old['policy']}{xla_part} "
            f"({old.get('verdict', 'faster')}, {old['speedup']:.2f}x).")


def _inconclusive(rec: dict, unsettled: list, model: dict) -> str:
    """--set-auto's refusal when the measurement cannot tell a gain from none: what was measured, why it is
    inconclusive, and the fix."""
    from trainer.auto_precision import stored_answer

    def ranged(u: dict) -> str:
        return "" if not u.get("range") else f"; its rounds' speed-ups ranged {u['range'][0]:.2f}-{u['range'][1]:.2f}x"

    measured = "; ".join(
        f"{u['by']} measured {u['name']} at {u['speedup']:.2f}x {rec['baseline']} (95% interval "
        f"{u['interval'][0]:.2f}-{u['interval'][1]:.2f}x, won {u['wins']} of {u['rounds']} rounds{ranged(u)})"
        for u in unsettled)
    measured = measured[:1].upper() + measured[1:]  # "The grid measured ...", after a full stop
    old = stored_answer(model)
    kept = (f"it keeps following the answer stored for this model on {old.get('when', '?')} ({old['policy']})"
            if old else "it keeps its own rule")
    return (f"--set-auto: NOTHING STORED: the measurement is inconclusive. {measured}: not measured faster, yet "
            f"no such interval rules out a gain of {LEAST_SPEEDUP:g}x or more, so it cannot tell whether "
            f"{rec['current_policy']} is the faster choice, and storing \"no gain\" would have precision=auto keep it "
            f"for this model on a guess. Meanwhile, train with precision={rec['current_policy']} (what you run now). "
            f"Fix: {_inconclusive_fix(rec)}. Nothing changed for precision=auto: {kept}.")


def _inconclusive_fix(rec: dict) -> str:
    """How to settle an inconclusive measurement, by whether the machine was measured noisy (the largest
    spread: the grid's, or --verify's when it trained, which replaced it): on a quiet one, waiting does not help,
    longer rounds do."""
    from trainer.doctor.noise import NOISY_SPREAD

    spread = (rec.get("spread") or {}).get("largest")
    longer = ("rerun with a larger --verify N: it trains the configuration whose interval reaches highest against "
              "what you run now through fit(), and longer rounds average more of the noise out")
    if spread is not None and spread <= NOISY_SPREAD:
        return f"{longer} (the machine was quiet: its rounds varied up to {spread:.2f}x)"
    if spread is None:
        return f"{longer}, or rerun when the machine is quieter"
    return f"rerun when the machine is quieter (its rounds varied up to {spread:.1f}x), or {longer}"


def _confirmed(rec: dict, model: dict) -> bool:
    """--set-auto when what the run uses is precision=auto's stored "faster" answer for this model, at its
    batch, and the doctor found nothing faster: the stored answer is confirmed (kept, its date renewed), not
    replaced by a "no gain" that would read as if that policy gained nothing. Said; False when it does not apply."""
    from trainer.auto_precision import save_doctor_answer, stored_answer

    old, current = stored_answer(model), rec.get("current") or {}
    if (old is None or old.get("verdict", "faster") != "faster" or old["policy"] != rec.get("current_policy")
            or old.get("batch") != current.get("batch")
            or (old.get("jit_compile") is not None and old["jit_compile"] != current.get("xla"))):
        return False
    found = ("every alternative measured slower" if rec.get("all_slower")
             else f"no alternative measured faster (every interval below {LEAST_SPEEDUP:g}x)")
    path = save_doctor_answer(old["policy"], old["command"], old["speedup"], model=model,
                              jit_compile=old.get("jit_compile"), batch=old.get("batch"), verdict="faster",
                              interval=old.get("interval"))
    print(f"--set-auto: confirmed the answer stored for {model['label']} on {old.get('when', '?')}: "
          f"{old['policy']} ({old['speedup']:.2f}x, batch {old.get('batch')}), which this run measured as what "
          f"you run now: {found}. Kept it, dated today (in {path}).")
    return True


def _store_kept(rec: dict, model: dict) -> None:
    """--set-auto when the answer is to keep what the run uses: stored as a measured no gain only when no
    configuration precision=auto could choose may be faster by a gain worth a change (every interval lies
    below decide.LEAST_SPEEDUP: decide.excludes_gain); else nothing is stored, and said why (_inconclusive)."""
    from trainer.auto_precision import NO_GAIN, save_doctor_answer

    current = rec.get("current") or {}
    batch, current_policy = current.get("batch"), rec.get("current_policy")
    measured = current.get("timed", True) or "speedup" in rec.get("verify", {})
    if current_policy is None or not measured:
        print("--set-auto: nothing stored (what you run now was not measured: not in the grid; --verify N "
              "trains it); precision=auto keeps its own choice")
        return
    if rec.get("gain_unsettled"):
        print(_inconclusive(rec, rec["gain_unsettled"], model))
        return
    if _confirmed(rec, model):
        return
    replaced = _replaced(model, current_policy, None, NO_GAIN, 1.0)
    checked = rec.get("verify", {})
    path = save_doctor_answer(current_policy, rec.get("current_command", rec["command"]), 1.0, model=model,
                              batch=batch, verdict=NO_GAIN,
                              interval=checked["interval"] if rec.get("withdrawn_config") else None)
    why = (f"--verify did not confirm {rec['withdrawn_config']} ({checked['speedup']:.2f}x, won {checked['wins']} "
           f"of {checked['rounds']} rounds, 95% interval below {LEAST_SPEEDUP:g}x), so the measured answer is no "
           f"gain over {current_policy}" if rec.get("withdrawn_config") and "speedup" in checked
           else f"the doctor measured no gain over {current_policy} (every interval below {LEAST_SPEEDUP:g}x)")
    print(f"--set-auto: {why} for {model['label']} (batch {batch}): stored that answer, with {current_policy} "
          f"(what you run now): precision=auto now chooses {current_policy} for it on this machine (stored in "
          f"{path}; other models keep the probe's rule; delete it to go back to the probe).{replaced}")


def _set_auto(rec: Optional[dict], model: dict) -> None:
    """--set-auto: precision=auto follows the doctor's verified answer on this machine, for runs of this
    recipe and model config (`model`: auto_precision.model_identity): a change of policy or XLA setting at
    the run's batch size, verified faster; or, when the measured answer is to keep what the run uses (every
    interval excludes a gain, --verify's for a withdrawn change), that policy. An inconclusive measurement
    stores nothing, and says so with the fix."""
    from trainer.auto_precision import save_doctor_answer

    if rec is None:
        print("--set-auto: nothing stored (no configuration was measured)")
        return
    if not rec.get("changed"):
        _store_kept(rec, model)
        return
    batch = (rec.get("current") or {}).get("batch")
    if rec.get("verdict") != "faster" or rec.get("verify", {}).get("verdict") != "faster":
        why = ("the change is simpler, not significantly faster" if rec.get("verdict") != "faster"
               else "the change is not verified faster: run with --verify N")
        print(f"--set-auto: nothing stored ({why}); precision=auto keeps its own choice")
        return
    if batch is not None and rec.get("batch", batch) != batch:
        print(f"--set-auto: nothing stored (the recommendation changes the batch size, {batch} -> {rec['batch']}, "
              "which precision=auto does not set: its gain was measured at the other batch. Run the doctor with "
              f"data.batch_size={rec['batch']} --verify N --set-auto to store an answer for runs at that batch)")
        return
    xla = rec.get("xla")  # the verified configuration's XLA setting, stored where it differs from the run's
    current = rec.get("current") or {}
    if xla is not None and "xla" in current and bool(current["xla"]) == bool(xla):
        xla = None
    measured = rec["verify"].get("speedup", rec["speedup"])  # as trained through fit()
    replaced = _replaced(model, rec["policy"], xla, "faster", measured)
    path = save_doctor_answer(rec["policy"], rec["command"], measured, model=model, jit_compile=xla, batch=batch,
                              interval=rec["verify"].get("interval"))
    with_xla = ("" if xla is None
                else f" with XLA {'on' if xla else 'off'} (where trainer.jit_compile is left at its default)")
    print(f"--set-auto: precision=auto now chooses {rec['policy']}{with_xla} on this machine for {model['label']} "
          f"(measured at batch {batch}; stored in {path}; other models keep the probe's rule; delete it to go "
          f"back to the probe).{replaced}")


@stops_on_signals("the doctor wrote no report (a partial measurement would mislead); run it again")
@reports_errors()
def main(argv=None) -> int:
    started = IMPORTED if __name__ == "__main__" else time.monotonic()  # called in-process: from this call
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m trainer.doctor", *map(shlex.quote, argv)])
    args = parse_args(argv)  # before TensorFlow loads (11-21 s): -h and bad arguments answer at once
    _check_overrides(args.overrides)
    quiet_tensorflow_import()
    from trainer.doctor.plot import plot_report
    from trainer.doctor.render import render_text
    from trainer.doctor.report import write_json

    log_command_to_stderr(logging.WARNING)  # TensorFlow's lines once (trainer/console.py)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.run:
        cfg, overrides, prefix, run_folder = load_run(args.run)
    else:
        cfg, overrides, prefix, run_folder = compose_config(args.overrides), args.overrides, None, None
    out = _out_folder(args, run_folder)
    _prepare_out_folder(out)
    report = diagnose_config(cfg, overrides, args.quick, prefix, command, args.verify)
    report["meta"]["command_seconds"] = time.monotonic() - started  # with start-up: what the user waited
    text = render_text(report)
    print(text, flush=True)  # first: the report is on screen even if writing the files fails
    write_json(report, out / "doctor.json")
    (out / "doctor.txt").write_text(text + "\n")
    now_kept(f"the report was written ({out / 'doctor.json'}, doctor.txt); what follows it (--set-auto's answer, "
             "the plot) may be missing: run the doctor again for them")
    if args.set_auto:
        from trainer.auto_precision import model_identity_of

        _set_auto(report.get("recommendation"), model_identity_of(cfg))
    missing_plot = plot_report(report, out / "doctor.png")
    print(missing_plot or f"wrote {out / 'doctor.json'}, {out / 'doctor.png'} and {out / 'doctor.txt'}")
    if missing_plot:
        print(f"wrote {out / 'doctor.json'} and {out / 'doctor.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # at exit, trainer/iterator_release.py waits for the grid's iterators still being freed
