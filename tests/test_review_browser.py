"""The review pages as a person sees them, in a headless Chromium: the served run's page in MLflow's
UI (description, child runs, datasets, logged model), its training-loss chart and a figure in the
artifact viewer, and the flow run's summary artifact in Prefect's UI. Each test saves a screenshot;
`make screenshots` collects them in docs/screenshots/."""

import os
import re
import shutil

import pytest
import requests

STAGES = ("preprocess", "sample_reference", "aggregate_vstar", "train_online", "evaluate")
SUMMARY_HEADER = ["stage", "status", "seconds", "peak RSS (MB)"]
# a run's Overview tab, not the navigation beside it (which reads 'Datasets' too)
MLFLOW_OVERVIEW = '[data-testid="entity-overview-container"]'

# Every <table> on the page as its header cells and its rows' cells (visible text, trimmed).
TABLES = """
const cells = (row, tag) => [...row.querySelectorAll(tag)].map(c => c.innerText.trim());
return [...document.querySelectorAll('table')].filter(t => t.getClientRects().length > 0).map(t => ({
  header: cells(t.querySelector('thead tr') || t.querySelector('tr'), 'th'),
  rows: [...t.querySelectorAll('tbody tr')].map(r => cells(r, 'td')),
}));
"""

# Scroll the i-th chart place (arguments[1]) of the section named arguments[0] to the middle of the
# window (MLflow's model-metrics tab draws a chart only once its place is in view; looked up afresh
# each time, as drawing re-renders the grid). Returns the section's number of places.
SCROLL_TO_CHART = """
const [name, i] = arguments;
const header = [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-section-header"]')]
  .find(h => h.innerText.split('\\n')[0].trim() === name);
let el = header;
while (el && !el.querySelector('[data-testid="draggable-chart-cards-grid"]')) el = el.parentElement;
if (!el) return 0;
const places = el.querySelector('[data-testid="draggable-chart-cards-grid"]').children;
if (i < places.length) places[i].scrollIntoView({block: 'center'});
return places.length;
"""

# Whether the chart titled arguments[0] (a metric key) has drawn its line; if so it is scrolled to the middle.
DRAWN_CHART = """
const title = document.querySelector(`h4[title="${arguments[0]}"]`);
const card = title && title.closest('[data-testid="experiment-view-compare-runs-card"]');
if (!card || !card.querySelector('.js-plotly-plot svg .trace')) return false;
card.scrollIntoView({block: 'center'});
return true;
"""


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory, request):
    """One folder for the module's screenshots; each PNG is also copied to $APO_SCREENSHOTS_DIR when set."""
    folder = tmp_path_factory.mktemp("screenshots")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nscreenshots of the review pages: {folder}")
    return folder


def shoot(browser, screenshots, name: str) -> None:
    path = browser.screenshot(screenshots / name)
    if os.environ.get("APO_SCREENSHOTS_DIR"):
        os.makedirs(os.environ["APO_SCREENSHOTS_DIR"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["APO_SCREENSHOTS_DIR"], name))


def parent_run(mlflow_server, served_run) -> dict:
    reply = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": served_run["mlflow_run_id"]},
                         timeout=30)
    assert reply.ok, reply.text[:300]
    return reply.json()["run"]


def open_mlflow_run(browser, mlflow_server, served_run) -> None:
    """Open the parent run's page, once it has loaded."""
    experiment = parent_run(mlflow_server, served_run)["info"]["experiment_id"]
    browser.open(f"{mlflow_server}/#/experiments/{experiment}/runs/{served_run['mlflow_run_id']}", "About this run")
    close_mlflow_assistant(browser)


def close_mlflow_assistant(browser) -> None:
    """MLflow 3.17 opens its chat panel beside every page; closed, the run page has room for its two columns."""
    browser.driver.execute_script(
        "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")


def test_mlflow_run_page_shows_description_child_runs_datasets_and_logged_model(
        browser, served_run, mlflow_server, screenshots):
    open_mlflow_run(browser, mlflow_server, served_run)
    first_line = (f"Held-out accuracy: reference {100 * served_run['reference_accuracy']:.1f}% -> "
                  f"trained {100 * served_run['trained_accuracy']:.1f}%")
    try:
        description = browser.text_around("Description", within=MLFLOW_OVERVIEW).splitlines()
        shown = [line.strip() for line in description[1:] if line.strip()]
        if not shown or not shown[0].startswith("Held-out accuracy:"):
            browser.fail(f"the run's description does not start with 'Held-out accuracy:': {shown[:3]}")
        if shown[0] != first_line:
            browser.fail(f"the description's first line is {shown[0]!r}, expected {first_line!r}")

        children = browser.text_around("Child runs", within=MLFLOW_OVERVIEW)
        listed = [name.strip() for name in children.removeprefix("Child runs").replace("\n", " ").split(",")]
        if sorted(listed) != sorted(STAGES):
            browser.fail(f"child runs {listed}, expected one per stage {list(STAGES)}")

        logged = browser.text_around("Logged models", within=MLFLOW_OVERVIEW, prefix=True)
        count = re.match(r"Logged models \((\d+)\)", logged)
        if not count or int(count.group(1)) < 1 or "model" not in logged.splitlines():
            browser.fail(f"no logged model named 'model' on the run page: {logged[:300]!r}")

        datasets = browser.text_around("Datasets", within=MLFLOW_OVERVIEW)
        if not re.search(r"^(train|test) \(", datasets.removeprefix("Datasets").strip()):
            browser.fail(f"the run page's Datasets entry shows no train/test dataset: {datasets[:300]!r}")
    finally:
        shoot(browser, screenshots, "mlflow-run.png")
    # the entry shows the first dataset and '+N' for the others, listed when it is clicked
    more = re.search(r"^\+\d+$", datasets, re.MULTILINE)
    if more:
        browser.click(more.group(0), within=MLFLOW_OVERVIEW)
    browser.wait_for_text("train (", "test (")


def chart_places(browser, section: str) -> int:
    """How many charts the model-metrics tab's section `section` holds (0: no such section)."""
    browser.wait_for_text("Add section")  # the sections are laid out
    return browser.driver.execute_script(SCROLL_TO_CHART, section, 0)


def test_training_loss_chart_of_the_train_online_run(browser, served_run, mlflow_server, screenshots):
    open_mlflow_run(browser, mlflow_server, served_run)
    browser.click("Model metrics")
    chart_run = "served"
    try:
        if not chart_places(browser, "train"):  # no train/* on the parent: open its train_online run from Child runs
            chart_run = "train_online"
            open_mlflow_run(browser, mlflow_server, served_run)
            browser.click("train_online", within='[data-testid="key-value-Child runs"]')
            browser.wait_for_text("About this run")
            if not browser.driver.current_url.endswith(served_run["mlflow_stage_runs"]["train_online"]):
                browser.fail("the Child runs link train_online did not open the train_online run")
            browser.click("Model metrics")
        places = chart_places(browser, "train")
        for i in range(places):  # bring the section's charts into view one by one until train/loss is drawn
            browser.driver.execute_script(SCROLL_TO_CHART, "train", i)
            if browser.driver.find_elements("css selector", 'h4[title="train/loss"]'):
                break
        browser.wait_until(lambda: browser.driver.execute_script(DRAWN_CHART, "train/loss"),
                           f"a chart titled train/loss, drawn, among the {places} of section 'train' of run {chart_run}")
        browser.wait_for_text(f"{chart_run} (train/loss)")  # its legend: run name (metric)
    finally:
        shoot(browser, screenshots, "mlflow-metrics.png")


def test_a_figure_opens_in_the_artifact_viewer(browser, served_run, mlflow_server, screenshots):
    open_mlflow_run(browser, mlflow_server, served_run)
    browser.click("Artifacts")
    browser.wait_for_text("summary.json")
    try:
        browser.click("figures")
        browser.click("stages.png")
        browser.wait_until(lambda: browser.driver.execute_script(
            "const img = document.querySelector('img[alt=\"figures/stages.png\"]');"
            "return img !== null && img.complete && img.naturalWidth > 0 && img.getClientRects().length > 0;"),
            "the image figures/stages.png displayed in the artifact viewer")
    finally:
        shoot(browser, screenshots, "mlflow-artifact.png")


def prefect_flow_run_id(prefect_ui, mlflow_server, served_run) -> str:
    """The flow run named in the MLflow run's tag apo.prefect.flow_run_id, or else the only run of flow `apo`."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    tags = {t["key"]: t["value"] for t in parent_run(mlflow_server, served_run)["data"].get("tags", [])}
    with SyncPrefectClient(f"{prefect_ui}/api") as client:
        if tags.get("apo.prefect.flow_run_id"):
            return str(client.read_flow_run(tags["apo.prefect.flow_run_id"]).id)
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["apo"])))
    assert len(runs) == 1, f"flow runs of apo on {prefect_ui}: {[r.name for r in runs]}"
    return str(runs[0].id)


def test_prefect_flow_run_shows_the_summary_table(browser, served_run, mlflow_server, prefect_ui, screenshots):
    flow_run_id = prefect_flow_run_id(prefect_ui, mlflow_server, served_run)
    browser.open(f"{prefect_ui}/runs/flow-run/{flow_run_id}", "Task Runs", "Artifacts")
    try:
        browser.click("Artifacts")
        browser.click("apo-summary-served")  # its card; the artifact's page renders the markdown
        browser.wait_for_text(*SUMMARY_HEADER)

        def summary_table():
            return next((t for t in browser.driver.execute_script(TABLES) if t["header"] == SUMMARY_HEADER), None)

        table = browser.wait_until(summary_table, f"a rendered table with the header {SUMMARY_HEADER}")
        if [row[0] for row in table["rows"]] != list(STAGES):
            browser.fail(f"the summary table's rows are {table['rows']}, expected one per stage {list(STAGES)}")
    finally:
        shoot(browser, screenshots, "prefect-flow-run.png")
