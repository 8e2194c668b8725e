"""The student copies are not run by nbval: their checkers are meant to say `not yet` (tests/test_exercises.py
executes them and checks exactly that)."""
collect_ignore_glob = ["*.ipynb"]
