"""experiments: what a heads file is used for, each run through the detection engine.

`ablation` (top-K vs random-K heads masked), `kv_curve` and `kv_output` (KV-cache policies replayed from a head
list), `specificity` (each score's heads ablated on each task) and `rescore` (the head set under another success
filter).

May import: `detection` and everything below it."""
