"""detection: load a model, prove its attention is recorded exactly, and run a detection.

`loading` (any Hugging Face causal LM, routed through the recorder), `decode` (the greedy decode loop and the
replay of finished sequences), `check` (`headscope check`: the recorder against eager attention on this model),
`engine` (one engine for every task and scorer: batches, success filter, resume) and `sweep_table` (the family
table that loading consults for its notes).

May import: `heads`, `runs`, `attention`, `tasks`, `options`, `scorers` and the foundation modules."""
