"""The family sweep (headscope/families/sweep.py): each causal-LM type ends as docs/families.md says -- exact, refused
in one line, or cannot-build. CI runs a subset (a hybrid with linear attention, one with its own cache class,
a Mamba hybrid, latent attention, a mask per head, a pure state-space model; each with its kv column); the whole sweep is behind the `families` marker
(`pytest -m families`, about 40 minutes on 2 cores; `python benchmarks/families.py` writes the table)."""
import pytest
import transformers

from headscope.families import sweep
from headscope.detection import sweep_table

SWEEP = sweep_table.load()
ROWS = SWEEP.rows
CI_SUBSET = ["qwen3_next", "minimax", "jamba", "deepseek_v3", "doge", "qwen4_exp_text", "mamba"]  # doge: a mask
# per head; qwen4_exp_text: token selection that leaves some queries no key inside the kv window


@pytest.mark.parametrize("installed", [None, "99.0.0"])
def test_the_table_and_the_guides_list_are_written_from_the_sweep(installed, monkeypatch):
    """...whatever transformers is installed: they say the release the rows were measured on."""
    if installed:
        monkeypatch.setattr(transformers, "__version__", installed)
    assert sweep_table.TABLE.read_text() == sweep_table.table(SWEEP)
    assert sweep_table.list_block(SWEEP) in sweep_table.GUIDE.read_text()
    assert f"transformers {SWEEP.transformers}" in sweep_table.list_block(SWEEP)


def test_the_sweep_has_no_crash_or_mismatch_and_every_type_of_its_release():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert {row["verdict"] for row in ROWS.values()} <= {sweep.EXACT, sweep.REFUSED, sweep.CANNOT_BUILD}
    if transformers.__version__ == SWEEP.transformers:  # another release's new types are "not swept", not a failure
        assert sweep_table.not_swept(SWEEP, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) == []
        assert set(ROWS) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_no_exact_types_kv_replay_differs_from_a_reduced_cache():
    """Every exact type's kv is exact, refused by name, or (listed in docs/model-support.md) a replay that changed
    nothing."""
    for model_type, row in ROWS.items():
        if row["verdict"] == sweep.EXACT:
            assert row["kv"].startswith(("exact", "off the interface: kv refuses it", "refused: ", "no effect: ")), \
                (model_type, row)


def test_a_type_the_sweep_never_ran_is_said_not_swept(toy_dir, monkeypatch, capsys):
    from headscope.detection import loading

    assert sweep_table.not_swept(SWEEP, [*ROWS, "brand_new_lm"]) == ["brand_new_lm"]
    loading.load(str(toy_dir))
    assert "not swept" not in capsys.readouterr().err  # llama is in the table
    fewer = sweep_table.Sweep(SWEEP.transformers, {t: row for t, row in ROWS.items() if t != "llama"})
    monkeypatch.setattr(sweep_table, "load", lambda: fewer)
    loading.load(str(toy_dir))
    assert f"model type 'llama' was not swept on transformers {transformers.__version__} (the family table, " \
           f"docs/families.md, is of transformers {SWEEP.transformers})" in capsys.readouterr().err


def test_the_ci_subset_is_exact_or_refused_as_the_table_says():
    assert [ROWS[t]["verdict"] for t in CI_SUBSET] == ["exact"] * 6 + ["refused"]


def sweep_one(model_type, tmp_path):
    outcome = sweep.sweep_type(model_type, tmp_path)
    expected = ROWS[model_type]
    assert (outcome.verdict, outcome.reason, outcome.kv) == (expected["verdict"], expected["reason"],
                                                             expected.get("kv", "")), outcome


@pytest.mark.parametrize("model_type", CI_SUBSET)
def test_ci_subset(model_type, tmp_path):
    sweep_one(model_type, tmp_path)


@pytest.mark.families
@pytest.mark.parametrize("model_type", sorted(set(ROWS) - set(CI_SUBSET)))
def test_every_family(model_type, tmp_path):
    sweep_one(model_type, tmp_path)
