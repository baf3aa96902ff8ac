"""Take docs/ranking_page.png: a real `zotune rank serve` session in headless Chromium.

    python docs/ranking_screenshot.py [--model smollm2-135m] [--out docs/ranking_page.png]

Starts the server on a free port in a temporary directory, submits one round by clicking (so the
history has a row), clicks two candidates of the next round and takes the screenshot. Needs
``chromium`` and ``chromium-driver`` (Debian) and ``selenium``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1360,1000")
PROMPTS = ["Describe a day at the beach in one sentence.", "What do you think of rainy weather?"]


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ranking_page.png")))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per round at most")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zotune-rank-shot-"))
    task = work / "prompts.jsonl"
    task.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    log = work / "server.log"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "zotune.cli", "rank", "serve", "--task", str(task),
                                   "--model", args.model, "--output-dir", str(work / "session"),
                                   "--m", "4", "--k", "2", "--lr", "0.05", "--mu", "0.01", "--max-new-tokens", "28",
                                   "--prompts-per-round", "2"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, stdin=subprocess.DEVNULL)
    driver = None
    try:
        deadline = time.monotonic() + args.timeout
        while not (found := re.search(r"open (http://\S+)", log.read_text())):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in FLAGS:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(found.group(1))
        wait = WebDriverWait(driver, args.timeout)
        wait.until(lambda d: d.find_element(By.ID, "round").text == "Round 0")
        for name in ("B", "D"):
            driver.find_element(By.ID, f"cand-{name}").click()
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "round").text == "Round 1")
        for name in ("C", "A"):
            driver.find_element(By.ID, f"cand-{name}").click()
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1360, max(700, height + 20))
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
