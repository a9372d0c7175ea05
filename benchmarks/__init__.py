"""The benchmarks behind docs/benchmarks.md and the defaults they justify. Each `bench*.py` here (and
`recompute_memory.py`) is a command: `python benchmarks/bench.py --help`. `workloads`, `runners`, `peak` and
`report` are bench.py's parts, which the other commands share; the timing itself is the library's
(trainer/timing.py), as the Trainer and the doctor time with it."""
