"""attention: what happens inside the model's attention, one call at a time.

The recorder (a function registered on transformers' attention interface: the model's own attention, plus each
head's top-k keys per query), its per-run state, ablation masks, KV-cache policies, the probe of a model's attention
layout, the eager reference it is checked against, and the tie rule. It knows nothing of tasks, runs or files.

May import: the foundation modules (errors, validate, ...) and `scorers` (the step view a scorer reads)."""
