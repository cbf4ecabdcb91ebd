"""The family sweep (headscope/sweep.py): each causal-LM type ends as docs/families.md says -- exact, refused
in one line, or cannot-build. CI runs a subset (a hybrid with linear attention, one with its own cache class,
a Mamba hybrid, latent attention, a pure state-space model); the whole sweep is behind the `families` marker
(`pytest -m families`, about 40 minutes on 2 cores; `python benchmarks/families.py` writes the table)."""
import json

import pytest

from headscope import sweep, sweep_table

ROWS = json.loads((sweep_table.ROOT / "docs" / "families.json").read_text())
CI_SUBSET = ["qwen3_next", "minimax", "jamba", "deepseek_v3", "mamba"]


def test_the_table_and_the_readme_list_are_written_from_the_sweep():
    assert sweep_table.TABLE.read_text() == sweep_table.table(ROWS)
    assert sweep_table.readme_block(ROWS) in sweep_table.README.read_text()


def test_the_sweep_has_every_type_and_no_crash_or_mismatch():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(ROWS) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert {row["verdict"] for row in ROWS.values()} <= {sweep.EXACT, sweep.REFUSED, sweep.CANNOT_BUILD}


def test_the_ci_subset_is_exact_or_refused_as_the_table_says():
    assert [ROWS[t]["verdict"] for t in CI_SUBSET] == ["exact"] * 4 + ["refused"]


def sweep_one(model_type, tmp_path):
    outcome = sweep.sweep_type(model_type, tmp_path)
    expected = ROWS[model_type]
    assert (outcome.verdict, outcome.reason) == (expected["verdict"], expected["reason"]), outcome


@pytest.mark.parametrize("model_type", CI_SUBSET)
def test_ci_subset(model_type, tmp_path):
    sweep_one(model_type, tmp_path)


@pytest.mark.families
@pytest.mark.parametrize("model_type", sorted(set(ROWS) - set(CI_SUBSET)))
def test_every_family(model_type, tmp_path):
    sweep_one(model_type, tmp_path)
