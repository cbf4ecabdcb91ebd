"""families: the sweep of every model type of transformers.

`recipes` and `toy` build a tiny random-weight model and tokenizer for each type; `sweep` runs the commands on
each and judges them against eager attention (`benchmarks/families.py` writes docs/families.md from it).

May import: everything (it drives the command line)."""
