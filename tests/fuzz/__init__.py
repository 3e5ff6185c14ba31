"""Property-based suite: arbitrary and malformed input to every RPC of the three services.

The generators (values.py, messages.py, cases.py), the farm they run against (farm.py), how a
case is sent (execute.py), what counts as a correct answer (verdicts.py) and the loop that runs
many cases (run.py) are shared by the pytest suite (test_fuzz.py) and bench/fuzz.py.
"""
