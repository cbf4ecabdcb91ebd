"""The bundled organisms' numbers in the README and the guides in docs/ are what benchmarks/readme_numbers.py recomputes
with their own commands: a change of default cannot leave a stale table. The cheap claims (marker `readme`, about a minute on 2 cores) run
in the default suite; ablation and kv (minutes) under the marker `slow`."""
import importlib.util
import sys
from pathlib import Path

import pytest

from headscope.organism import CHECKPOINT_DIR

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "readme_numbers.py"
spec = importlib.util.spec_from_file_location("readme_numbers", SCRIPT)
readme_numbers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = readme_numbers  # its dataclass looks its module up there
spec.loader.exec_module(readme_numbers)

pytestmark = [pytest.mark.readme,
              pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no organism checkpoint")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder of runs for every claim (the claims share the retrieval run)."""
    return tmp_path_factory.mktemp("readme_runs")


@pytest.mark.parametrize("claim", [pytest.param(claim, id=claim.name, marks=[pytest.mark.slow] if claim.slow else [])
                                   for claim in readme_numbers.CLAIMS])
def test_the_readme_prints_what_the_script_computes(claim, work):
    for passage in claim.passages(work):
        assert readme_numbers.printed_in(passage, claim.path.read_text()), \
            f"{claim.doc} is stale; it should say:\n{passage}"


def test_a_changed_number_is_caught():
    table = "| query (QRHead) | 1-0 (0.13), 1-5 (0.13), 1-3 (0.12), 1-1 (0.11), 1-7 (0.11) |"
    scorers = (readme_numbers.ROOT / "docs" / "scorers.md").read_text()
    assert readme_numbers.printed_in(table, scorers)
    assert not readme_numbers.printed_in(table.replace("0.13", "0.28", 1), scorers)
    method = (readme_numbers.ROOT / "docs" / "method.md").read_text()
    assert readme_numbers.printed_in("0-0 17.1, 0-7 15.7,\n   4-1 11.4", method)  # wrapped prose still matches


def test_every_claim_names_a_file_that_exists():
    assert all(claim.path.is_file() for claim in readme_numbers.CLAIMS)
