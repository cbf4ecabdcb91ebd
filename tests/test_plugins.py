"""A scorer defined here, outside the package, runs through the CLI next to the built-in one."""
import json


from headscope.cli.commands import main
from headscope.scorers import Scorer


class LastTokenScorer(Scorer):
    """Attention mass on the position just fed (the "previous token" of the step), summed over steps."""

    name = "last_token"
    top_k = 3

    def step_scores(self, view):
        current = view.positions.amax(-1, keepdim=True)  # the newest position any head attends to
        return (view.values * (view.positions == current)).sum(-1)


def test_custom_scorer_runs_through_the_cli_beside_retrieval(toy_dir, data_dir, tmp_path):
    code = main(["detect", "retrieval", "--model", str(toy_dir), "--out", str(tmp_path), "--quiet",
                 "--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
                 "--context-lengths", "260", "--depths", "0,100", "--success-threshold", "-1",
                 "--max-new-tokens", "5", "--scorer", "retrieval,test_plugins:LastTokenScorer"])
    assert code == 0
    name = toy_dir.name
    ours = json.loads((tmp_path / f"{name}_retrieval_last_token_heads.json").read_text())
    builtin = json.loads((tmp_path / f"{name}_retrieval_heads.json").read_text())
    assert ours.keys() == builtin.keys()
    assert all(len(scores) == 2 for scores in ours.values())
    assert any(score > 0 for scores in ours.values() for score in scores)
    rows = [json.loads(line) for line in (tmp_path / f"{name}_retrieval_last_token_samples.jsonl").open()]
    assert {row["scorer"] for row in rows} == {"last_token"}


def test_unknown_scorer_is_one_clear_line(toy_dir, tmp_path, capsys):
    assert main(["detect", "reasoning", "--model", str(toy_dir), "--out", str(tmp_path), "--scorer", "nope"]) == 2
    assert "unknown scorer 'nope'" in capsys.readouterr().err
    assert not tmp_path.joinpath("x").exists() and not any(tmp_path.iterdir())
