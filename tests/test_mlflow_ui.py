"""The MLflow UI as a user sees it: a real sweep's runs listed in headless Chromium, nested under the parent, and
the page metalab prints opening in the UI's model-training view."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metalab.tracking.uri import ui_page
from tests.conftest import BIN, run_cli

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    # .ci/run installs Debian's chromium + chromium-driver, so in CI a missing browser is a failure.
    message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    """`mlflow server` on a free loopback port over a store filled by a tiny real sweep."""
    result = run_cli(["-m", "debug=smoke", "algorithm=maml,fomaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    port = free_port()
    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded: at most 60 s for the server to come up
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer on /health within 60 s")
        yield url, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_sweep_runs_are_listed_nested_under_their_parent(server, tmp_path: Path) -> None:
    url, client = server
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("metalab.sweep_parent") == "true"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    children = sorted(run.info.run_name for run in runs if run is not parent)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        wait = WebDriverWait(browser, 60)
        body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
        wait.until(lambda _: parent.info.run_name in body())
        assert "3 matching runs" in body()
        assert not any(name in body() for name in children)  # collapsed: the jobs sit under the parent
        browser.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
        wait.until(lambda _: all(name in body() for name in children))
        browser.save_screenshot(str(tmp_path / "mlflow-ui-sweep.png"))
        # The page metalab prints: the "Model training" view (its sidebar has the model registry), not the GenAI
        # one that a fresh browser opens in (its sidebar files runs under "Evaluation runs").
        browser.get(ui_page(url, experiment.experiment_id))
        wait.until(lambda _: "Model registry" in body() and parent.info.run_name in body())
        assert "Evaluation runs" not in body()
    finally:
        browser.quit()
    assert (tmp_path / "mlflow-ui-sweep.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "mlflow-ui-sweep.png", Path(__file__).parent.parent / ".cache" / "mlflow-ui-sweep.png")
