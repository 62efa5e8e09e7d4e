"""The page of ``--mode=serve`` in headless Chromium: time from upload to grades, screenshots.

  python benchmarks/serve_page.py --images=a.png,b.png [--workdir=W] [--repeats=5] \
      [--screenshots=docs/images] [--cell=kl:1:2]

Starts ``run.py --mode=serve`` (the shipped grader without ``--workdir``), opens the page
in Debian's Chromium through its chromedriver (``apt install chromium chromium-driver``;
selenium from the ``webtest`` extra), uploads the images ``--repeats`` times and prints,
per upload, the seconds the page itself measured from sending the files to having the
grades (the first upload after the server's warm-up included). With ``--screenshots``
it saves the grade view, and, for a workdir with an evaluated validation split, the
browse view with the ``--cell`` (task:true:pred) opened.

``tests/test_serve.py`` drives the page with the same helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str | None, port: int, log_path: Path,
                 timeout_s: float = 300.0) -> subprocess.Popen:
    """``run.py --mode=serve`` in a subprocess; returns once the page answers.

    Raises:
      RuntimeError: the server ended or did not answer in time (its log attached).
    """
    args = [sys.executable, str(REPO / "run.py"), "--mode=serve", f"--port={port}"]
    if workdir:
        args.append(f"--workdir={workdir}")
    log = log_path.open("w")
    server = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server ended with {server.returncode}:\n"
                               f"{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not answer in {timeout_s:.0f} s:\n"
                       f"{log_path.read_text()[-3000:]}")


def open_browser(user_data_dir: str, width: int = 1280, height: int = 1000):
    """Headless Debian Chromium through its chromedriver; nothing is downloaded."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The flags keep Chromium from calling home, which a closed network refuses.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait_for(driver, condition, timeout_s: float = 120.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        condition, message=f"waiting for {what}")


def open_page(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda d: d.find_element(By.ID, "model").text, what="the model line")


def grade_in_page(driver, files: list[Path], side: str = "auto") -> dict:
    """Uploads ``files`` through the page's file input; returns ``{'seconds', 'status',
    'knees': {file name: {task: grade}}, 'errors': {file name: message}}`` as the page
    shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.execute_script("document.getElementById('status').textContent = '';"
                          "document.getElementById('results').textContent = '';")
    chooser = driver.find_element(By.ID, "files")
    driver.execute_script("arguments[0].value = '';", chooser)  # send_keys adds to the list
    chooser.send_keys("\n".join(str(f) for f in files))
    Select(driver.find_element(By.ID, "side")).select_by_value(side)
    driver.find_element(By.ID, "grade").click()
    status = wait_for(driver, lambda d: (d.find_element(By.ID, "status").text
                                         if "graded" in d.find_element(By.ID, "status").text
                                         or "error" in d.find_element(By.ID, "status")
                                         .get_attribute("innerHTML") else False),
                      what="the grades")
    knees = {}
    for knee in driver.find_elements(By.CSS_SELECTOR, "#results .knee[data-file]"):
        knees[knee.get_attribute("data-file")] = {
            cell.get_attribute("data-task"): int(cell.text)
            for cell in knee.find_elements(By.CSS_SELECTOR, "td.predicted")}
    errors = {node.get_attribute("data-error"): node.text
              for node in driver.find_elements(By.CSS_SELECTOR, "#results [data-error]")}
    seconds = driver.find_element(By.ID, "status").get_attribute("data-seconds")
    return {"seconds": float(seconds) if seconds else None, "status": status, "knees": knees,
            "errors": errors}


def drop_in_page(driver, path: Path) -> str:
    """Drops ``path`` on the page's drop zone (a JavaScript drop event carrying the file, as
    a drag from the desktop does); returns the status line once the page has graded it."""
    import base64

    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('status').textContent = '';")
    driver.execute_script("""
        const [name, data] = arguments;
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, path.name, base64.b64encode(path.read_bytes()).decode())
    return wait_for(driver, lambda d: (d.find_element(By.ID, "status").text
                                       if "graded" in d.find_element(By.ID, "status").text
                                       else False), what="the dropped file's grades")


def open_cell(driver, task: str, true: int, pred: int) -> list[dict]:
    """Browse view: clicks a confusion-matrix cell; returns the listed knees
    ``[{'index', 'text', 'picture_loaded'}]`` once their pictures have loaded."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "tab-browse").click()
    cell = wait_for(driver, lambda d: d.find_element(
        By.CSS_SELECTOR, f"table.matrix[data-task='{task}'] td[data-true='{true}'][data-pred='{pred}']"),
        what=f"the {task} confusion matrix")
    expected = min(int(cell.text), 60)
    cell.click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cell-list .item")) == expected,
             what=f"{expected} knees of the cell")
    wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#cell-list img')].every(i => i.complete)"),
        what="the knees' pictures")
    return [{"index": int(item.get_attribute("data-index")), "text": item.text,
             "picture_loaded": driver.execute_script(
                 "const i = arguments[0].querySelector('img'); return !!i && i.naturalWidth > 0",
                 item)}
            for item in driver.find_elements(By.CSS_SELECTOR, "#cell-list .item")]


def requested_origins(driver) -> set[str]:
    """Origins of every resource the page loaded (data: URLs excluded)."""
    urls = driver.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    return {"/".join(u.split("/")[:3]) for u in urls if not u.startswith("data:")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="comma-separated image files")
    parser.add_argument("--workdir", default="", help="workdir or model folder (default: shipped)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshots", default="", help="folder for the two screenshots")
    parser.add_argument("--cell", default="kl:1:2", help="browse: task:true:pred to open")
    parser.add_argument("--json", default="", help="write the timings here")
    args = parser.parse_args()
    images = [Path(p).resolve() for p in args.images.split(",")]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        server = start_server(args.workdir or None, port, Path(tmp) / "server.log")
        start_s = time.time() - started
        driver = open_browser(str(Path(tmp) / "chromium"))
        try:
            open_page(driver, f"http://127.0.0.1:{port}/")
            runs = [grade_in_page(driver, images) for _ in range(args.repeats)]
            for k, run in enumerate(runs):
                print(f"upload {k + 1}: {run['seconds']:.2f} s  {run['knees']}")
            if args.screenshots:
                folder = Path(args.screenshots)
                folder.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(folder / "serve_grade.png"))
                if driver.execute_script("return model.splits.length"):
                    task, true, pred = args.cell.split(":")
                    listed = open_cell(driver, task, int(true), int(pred))
                    driver.save_screenshot(str(folder / "serve_browse.png"))
                    print(f"screenshots in {folder} ({len(listed)} knees in the opened cell)")
                else:
                    print(f"screenshot in {folder}; no evaluated split to browse")
            origins = requested_origins(driver)
        finally:
            driver.quit()
            server.terminate()
            server.wait(30)
    record = {"server_start_s": round(start_s, 1), "images": [p.name for p in images],
              "upload_to_grades_s": [r["seconds"] for r in runs], "origins": sorted(origins)}
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
