"""The old name of `trainer.step_functions` (the XLA decisions it re-exported live in `trainer.xla_plan`)."""
from trainer.step_functions import StepFunctions, make_eval_function, make_train_function
from trainer.xla_plan import XlaPlan, decide_jit_compile, plan_xla, wrap_xla

__all__ = ["StepFunctions", "XlaPlan", "decide_jit_compile", "make_eval_function", "make_train_function", "plan_xla",
           "wrap_xla"]
