"""Putting a launched run to the test from outside: faults injected into its processes
(`inject`), a corpus of malformed replies fed to rank 0's receiving code (`malformed`), and
fuzzers of the config and inventory parsers (`fuzzing`, which needs hypothesis: the `test`
extra).  The tests and bench/faults.py use them."""
