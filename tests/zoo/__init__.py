"""The transformers zoo: every model type transformers can build from a tiny random-init config,
inspected and rewritten exactly, with the attention calls that really run counted on both sides.

`zoo.py` builds the entries and measures one; `run_zoo.py` runs the whole zoo and writes
docs/zoo_coverage.md; `test_zoo.py` is the slow pytest tier over a fixed representative set.
"""
