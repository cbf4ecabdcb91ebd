"""headscope report: one self-contained page per run; its figures equal the run's files; it opens in Chromium.

The browser test needs Debian's `chromium` and `chromium-driver`; without them it is skipped, unless
HEADSCOPE_BROWSER_TEST=require (set by .ci/run, which installs them), where it fails instead.
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import headscope
from headscope.heads import analysis
from headscope.runs import outputs
from headscope.experiments.ablation import ablate
from headscope.cli.commands import main
from headscope.heads import HeadScores
from headscope.cli.report import report

MAX_PAGE_BYTES = 5_000_000


def page_data(path: Path) -> dict:
    """The JSON the page's script reads (heads, contributions, chart specs)."""
    html = path.read_text()
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


def two_runs(runs: dict, folder: Path) -> Path:
    """A folder holding the reasoning run and the query run."""
    shutil.copytree(runs["reasoning"], folder, ignore=shutil.ignore_patterns("*.html"))
    for file in runs["query"].glob("organism_query_*"):
        shutil.copy(file, folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The organism's default retrieval run (as `headscope detect retrieval` writes it) with an ablation, a rescore
    and a specificity matrix beside it; a reasoning run; a query run (signed scores)."""
    root = tmp_path_factory.mktemp("report")
    retrieval = root / "head_scores"
    assert main(["detect", "retrieval", "--out", str(retrieval), "--quiet"]) == 0  # the organism's own grid
    heads = str(retrieval / "organism_retrieval_heads.json")
    small = dict(context_lengths=[300], depths=[0, 100], quiet=True)
    ablate("retrieval", heads, [1, 8], repeats=1, out=str(retrieval), **small)
    assert main(["rescore", str(retrieval), "--metric", "f1", "--threshold", "40,99"]) == 0
    assert main(["specificity", "--scores", heads, "--tasks", "retrieval", "--top", "8", "--repeats", "1",
                 "--out", str(retrieval), "--context-lengths", "300", "--depths", "50", "--quiet"]) == 0
    reasoning, query = root / "reasoning", root / "query"
    headscope.detect("reasoning", out=str(reasoning), quiet=True, num_samples=12)
    headscope.detect("query", out=str(query), quiet=True, num_samples=12)
    return {"retrieval": retrieval, "reasoning": reasoning, "query": query}


def test_the_organism_report_holds_the_runs_figures(runs):
    """Every figure of the page equals the run's own files: ranking and means (summary.json), intervals and
    P(top K) (analysis.bootstrap on the samples), contributions (samples.jsonl); the excerpt highlights the needle."""
    folder = runs["retrieval"]
    assert main(["report", str(folder)]) == 0
    path = folder / "report.html"
    html = path.read_text()
    assert path.stat().st_size < MAX_PAGE_BYTES
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html  # nothing fetched when opened
    data = page_data(path)

    summary = json.loads((folder / "organism_retrieval_summary.json").read_text())
    assert [head["id"] for head in data["heads"]] == [key for key, _ in outputs.ranked(summary)]
    for head in data["heads"]:
        assert head["mean"] == pytest.approx(summary[head["id"]]["mean"], abs=1e-12)
        assert head["count"] == summary[head["id"]]["count"]
    rows = analysis.read_samples(folder / "organism_retrieval_samples.jsonl")
    keys = json.loads((folder / "organism_retrieval_manifest.json").read_text())["heads"]
    expected = analysis.bootstrap(analysis.sample_contributions(rows, keys), True, 1000, 10)
    by_index = {head["index"]: head for head in data["heads"]}
    for index in range(len(keys)):
        assert by_index[index]["ci_low"] == pytest.approx(expected["ci_low"][index])
        assert by_index[index]["p_top_k"] == pytest.approx(expected["p_top_k"][index])
    assert np.allclose(np.array(data["contributions"]), [np.ravel(row["head_scores"]) for row in rows], atol=1e-5)

    assert html.count('<tr data-head="') == len(keys) == 48
    assert html.count('class="sample passed"') == sum(row["passed"] for row in rows) == 100
    for row in rows:  # the highlighted tokens are the needle's answer, as the scorer located it
        assert row["excerpt"][1].strip() == row["reference"]
        assert f"<mark>{row['excerpt'][1]}</mark>" in html
    for section in ("run", "heads", "niah", "ablation", "specificity", "rescore", "samples"):
        assert f'<section id="{section}">' in html
    assert html.count('<img class="picture" src="data:image/png;base64,') == 4  # ablation x2, specificity, rescore
    assert data["charts"]["heatmap"]["encoding"]["color"]["scale"] == {"scheme": "viridis"}


@pytest.mark.parametrize("kind", ["reasoning", "query"])
def test_reasoning_and_query_reports(kind, runs):
    folder = runs[kind]
    [path] = report(folder, bootstrap=200)
    assert path == folder / "report.html" and path.stat().st_size < MAX_PAGE_BYTES
    html, data = path.read_text(), page_data(path)
    rows = analysis.read_samples(folder / f"organism_{kind}_samples.jsonl")
    for outcome, count in (("passed", sum(r["passed"] for r in rows)),
                           ("failed", sum(not r["passed"] and not r["error"] for r in rows))):
        assert html.count(f'class="sample {outcome}"') == count
    assert data["charts"]["niah"] is None and '<section id="niah">' not in html  # not a needle grid
    scale = data["charts"]["heatmap"]["encoding"]["color"]["scale"]
    means = [head["mean"] for head in data["heads"]]
    if kind == "query":  # signed scores: a diverging map centred on 0
        assert min(means) < 0 < max(means) and scale["domainMid"] == 0 and scale["scheme"] == "redblue"
    else:
        assert min(means) >= 0 and "domainMid" not in scale


def test_an_all_zero_run_of_an_older_headscope(runs, tmp_path):
    """A run where no head ever scored draws no heatmap (a flat one would look like a result) and says so; rows
    of an older headscope (no excerpt, no accumulation rule) still render, without excerpts or intervals."""
    folder = tmp_path / "zero"
    shutil.copytree(runs["reasoning"], folder)
    samples = folder / "organism_reasoning_samples.jsonl"
    rows = analysis.read_samples(samples)
    for row in rows:
        row["head_scores"] = np.zeros_like(row["head_scores"]).tolist()
        del row["excerpt"], row["keep_zeros"]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    [path] = report(folder)
    html = path.read_text()
    assert page_data(path)["charts"]["heatmap"] is None and 'id="heatmap"' not in html
    assert "nothing was detected" in html
    assert html.count("the prompt was not kept") == len(rows) and "95% CI low" not in html


def test_a_legacy_heads_file_enters_the_means_and_is_named(runs, tmp_path):
    """A Retrieval_Head heads file set aside by detect (NAME_TASK_base_heads.json) counts in the means, as in
    the run's own files, and the page says the intervals do not resample it."""
    folder = tmp_path / "legacy"
    shutil.copytree(runs["query"], folder, ignore=shutil.ignore_patterns("*.html"))
    own = json.loads((folder / "organism_query_heads.json").read_text())
    outputs.atomic_write_json(folder / "organism_query_base_heads.json", {key: [5.0] for key in own})
    [path] = report(folder, bootstrap=50)
    means = {head["id"]: head["mean"] for head in page_data(path)["heads"]}
    assert means == pytest.approx({key: (5.0 + sum(scores)) / (1 + len(scores)) for key, scores in own.items()})
    assert "legacy lists of organism_query_base_heads.json" in path.read_text()


def test_compare_two_runs(runs, tmp_path):
    out = tmp_path / "compared.html"
    assert main(["report", str(runs["reasoning"]), "--compare", str(runs["query"]), "--out", str(out)]) == 0
    data, html = page_data(out), out.read_text()
    mine = HeadScores.load(runs["reasoning"] / "organism_reasoning_summary.json")
    other = HeadScores.load(runs["query"] / "organism_query_summary.json")
    expected = analysis.compare(mine, other, [5, 10, 20, 30])
    assert f"<strong>{expected['spearman']:.3f}</strong>" in html
    for entry in expected["per_k"]:
        assert f"<td>{entry['k']}</td><td>{entry['overlap']}</td><td>{entry['jaccard']:.3f}</td>" in html
    points = {point["id"]: (point["a"], point["b"]) for point in data["charts"]["scatter"]["data"]["values"]}
    assert points == {key: (mine.summary[key]["mean"], other.summary[key]["mean"]) for key in mine.summary}

    # two runs of one folder: --compare names the other by one of its files
    both = two_runs(runs, tmp_path / "both")
    again = tmp_path / "again.html"
    assert main(["report", str(both), "--run", "organism_reasoning", "--compare",
                 str(both / "organism_query_heads.json"), "--out", str(again)]) == 0
    assert page_data(again)["charts"]["scatter"]["data"] == data["charts"]["scatter"]["data"]
    assert "Compared with both/organism_query: query" in again.read_text()


def test_a_folder_of_several_runs_gets_a_page_each(runs, tmp_path):
    both = two_runs(runs, tmp_path / "both")
    assert report(both, bootstrap=0) == [both / "organism_query_report.html", both / "organism_reasoning_report.html"]
    (both / "organism_query_report.html").unlink()
    assert report(both, run="organism_query", bootstrap=0) == [both / "organism_query_report.html"]
    assert "organism_query" in (both / "organism_query_report.html").read_text()
    assert not (both / "report.html").exists()


@pytest.mark.parametrize("case", ["empty folder", "missing folder", "unmerged shards", "--out with two runs",
                                  "unknown --run", "--k 0", "--k 49", "--bootstrap -1"])
def test_bad_input_is_one_line_exit_2_and_no_page(case, runs, tmp_path, capsys):
    argv = ["report", str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    expected = "no detect run in"
    if case == "missing folder":
        argv, expected = ["report", str(tmp_path / "nowhere")], "no such folder"
    elif case == "unmerged shards":
        (tmp_path / "empty" / "organism_retrieval_samples.shard-0-of-2.jsonl").write_text("")
        expected = "headscope merge"
    elif case in ("--out with two runs", "unknown --run"):
        both = two_runs(runs, tmp_path / "both")
        argv = ["report", str(both)] + (["--out", str(tmp_path / "empty" / "r.html")] if case.startswith("--out")
                                        else ["--run", "organism_pattern"])
        expected = "pick one with --run" if case.startswith("--out") else "no run 'organism_pattern'"
    elif case.startswith(("--k", "--bootstrap")):
        argv = ["report", str(runs["query"]), "--out", str(tmp_path / "r.html"), *case.split()]
        expected = "--bootstrap must be 0" if case.startswith("--bootstrap") else "--k must be between 1 and the number of heads (48)"
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert expected in error and error.count("\n") == 1
    assert not list(tmp_path.rglob("*.html")) and not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------ the browser

def chromium_driver():
    """A headless Chromium driven by Debian's chromedriver, or a skip (a failure when it is required)."""
    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (chromium and chromedriver):
        if os.environ.get("HEADSCOPE_BROWSER_TEST") == "require":
            pytest.fail("HEADSCOPE_BROWSER_TEST=require but chromium/chromedriver are not installed "
                        "(apt-get install chromium chromium-driver)")
        pytest.skip("no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1366,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def open_page(driver, path: Path) -> list[dict]:
    """Load the page, wait until every chart is drawn; returns the console messages."""
    driver.get(path.resolve().as_uri())
    deadline = time.time() + 30
    while not driver.execute_script("return document.body.dataset.ready") and time.time() < deadline:
        time.sleep(0.1)
    assert driver.execute_script("return document.body.dataset.ready") == "true", driver.get_log("browser")
    return driver.get_log("browser")


def visible_samples(driver) -> list:
    return [s for s in driver.find_elements("css selector", ".sample") if s.is_displayed()]


def test_the_report_in_chromium(runs, tmp_path):
    """The organism's report in a real browser: heatmap and table drawn, no console message above INFO, clicks
    select heads and filter samples; a screenshot is saved (and copied to $HEADSCOPE_REPORT_SCREENSHOT)."""
    assert main(["report", str(runs["retrieval"]), "--compare", str(runs["retrieval"])]) == 0
    for kind in ("reasoning", "query"):
        report(runs[kind], bootstrap=100)
    driver = chromium_driver()
    try:
        page = runs["retrieval"] / "report.html"
        messages = open_page(driver, page)
        assert not [m for m in messages if m["level"] in ("SEVERE", "WARNING")], messages
        css = lambda selector: driver.find_elements("css selector", selector)  # noqa: E731
        assert len(css("#heatmap g.mark-rect.role-mark path")) == 48
        assert len(css("#niah-chart g.mark-rect.role-mark path")) == 4 * 5  # lengths x depths
        assert len(css("#scatter g.role-mark path")) == 48
        assert len(css("#head-table tbody tr")) == 48
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG"
        if os.environ.get("HEADSCOPE_REPORT_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["HEADSCOPE_REPORT_SCREENSHOT"])

        data = page_data(page)
        assert driver.find_element("id", "selected-id").text == data["heads"][0]["id"]  # the best head to start
        # a click on a heatmap cell selects that head; each sample shows its contribution to it
        cell = next(p for p in css("#heatmap g.mark-rect.role-mark path")
                    if "head id: 2-3;" in p.get_attribute("aria-label"))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        cell.click()
        assert driver.find_element("id", "selected-id").text == "2-3"
        index = next(head["index"] for head in data["heads"] if head["id"] == "2-3")
        shown = [float(s.find_element("css selector", ".contribution").text) for s in css(".sample")[:10]]
        assert shown == pytest.approx([scores[index] for scores in data["contributions"][:10]], abs=1e-4)
        assert css("#head-table tr.selected")[0].get_attribute("data-head") == "2-3"
        # a table row selects too; a header sorts
        row = css('#head-table tr[data-head="1-4"]')[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
        row.click()
        assert driver.find_element("id", "selected-id").text == "1-4"
        header = css("#head-table th")[4]  # mean
        driver.execute_script("arguments[0].click()", header)  # descending
        driver.execute_script("arguments[0].click()", header)  # ascending
        means = [float(r.find_elements("tag name", "td")[4].text) for r in css("#head-table tbody tr")]
        assert means == sorted(means) and means != sorted(means, reverse=True)
        # a NIAH cell lists its samples; the outcome filter hides the others
        niah = next(p for p in css("#niah-chart g.mark-rect.role-mark path")
                    if "context length (prompt tokens): 300 (" in p.get_attribute("aria-label")
                    and "depth (%): 50" in p.get_attribute("aria-label"))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", niah)
        niah.click()
        listed = visible_samples(driver)
        assert len(listed) == 5 and all("-L300-d50" in s.find_element("tag name", "strong").text for s in listed)
        driver.execute_script("document.querySelector('input[value=failed]').click()")
        assert visible_samples(driver) == []

        for kind in ("reasoning", "query"):  # the other kinds of run render too
            messages = open_page(driver, runs[kind] / "report.html")
            assert not [m for m in messages if m["level"] in ("SEVERE", "WARNING")], messages
            assert len(css("#heatmap g.mark-rect.role-mark path")) == 48
    finally:
        driver.quit()
