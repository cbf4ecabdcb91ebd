"""runs: the run folder as a database.

What a run is (its identity: model, tokenizer, data and options fingerprints), the files it writes (schema,
output paths, the heads table format), writer locks, and the store that appends, resumes and merges rows and
refuses to join rows of another model or data.

May import: the foundation modules, `scorers`, `options` and `tasks` (a run's rows are a task's samples)."""
