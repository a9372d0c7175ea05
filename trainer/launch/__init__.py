"""`python -m trainer.launch`: starts, watches and restarts the workers of a multi-worker run (see __main__)."""
