"""The small retrieval run on the toy model that the fault-injection and second-hour tests share (conftest's
`toy_run`, copied per test by `run_folder`)."""

PREFIX = "toy0_retrieval"  # the session toy model's folder is "toy0"


def detect_args(toy_dir, data_dir, out, *extra) -> list[str]:
    """`headscope detect retrieval` on the toy: 3 samples (one context length, three depths), every one passing."""
    return ["detect", "retrieval", "--model", str(toy_dir), "--out", str(out), "--haystack", str(data_dir / "haystack"),
            "--needles", str(data_dir / "needles.jsonl"), "--context-lengths", "260", "--depths", "0,50,100",
            "--success-threshold", "-1", "--max-new-tokens", "24", "--no-stop-at-newline", "--quiet", "--no-plots",
            *extra]
