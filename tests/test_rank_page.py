"""End to end: the ranking page of ``zotune rank serve`` in a real headless Chromium.

The server runs as a subprocess (``python -m zotune.cli rank serve``, a tiny random Llama with
LoRA, m=4, k=2) on a free port; Selenium drives Debian's ``chromium`` through its
``chromium-driver``. Rounds are submitted by clicking cards; the server is killed (SIGKILL, by
pid) in the middle and restarted on the same output directory; bad submissions (fewer than k,
duplicate and unknown positions, malformed JSON, a stale round, a wrong token) must show an error
on the page and leave the saved session byte for byte. Without the browser stack the test skips
and says what to install. Runtime: ~15-25 s (two server starts, four rounds).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import zotune

SRC = Path(zotune.__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")
START_TIMEOUT = 120  # seconds for a server to print its URL (imports torch and transformers)


def browser_or_skip():
    """A headless Chromium driven by Selenium, or a skip that says what is missing."""
    why = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        why = "selenium is not installed (pip install -e '.[test]')"
    else:
        missing = [p for p in (CHROMIUM, DRIVER) if not os.access(p, os.X_OK)]
        if missing:
            why = f"{', '.join(missing)} missing (apt-get install -y chromium chromium-driver)"
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        why = f"{exc.name} is not installed (pip install -e '.[test]')"
    if why:
        print(f"\ntest_rank_page skipped: {why}", file=sys.stderr)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


class Server:
    """``zotune rank serve`` in a subprocess; ``url`` is what it printed."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "zotune.cli", "rank", "serve", *args],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"open (http://127\.0\.0\.1:\d+/\?token=\S+)", log.read_text())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the server did not start:\n{log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.out.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ranking_page_end_to_end(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("The movie was", "It was the", "Tell me about the sea")))
    out = tmp_path / "session"
    args = ["--output-dir", str(out)]
    first = ["--task", str(prompts), "--model", "tiny-llama", "--m", "4", "--k", "2", "--mu", "0.5",
             "--max-new-tokens", "6", "--prompts-per-round", "2", "--seed", "3"]
    servers = []
    wait = WebDriverWait(driver, 60)

    def round_shown(n):
        wait.until(lambda d: d.find_element(By.ID, "round").text == f"Round {n}")

    def error_text():
        return driver.find_element(By.ID, "error").text

    def cards():
        return {c.get_attribute("id")[len("cand-"):]: [t.text for t in c.find_elements(By.CLASS_NAME, "text")]
                for c in driver.find_elements(By.CLASS_NAME, "card")}

    def rank_by_clicking(labels):
        for name in labels:
            driver.find_element(By.ID, f"cand-{name}").click()
        driver.find_element(By.ID, "submit").click()

    def call(script):  # run one of the page's own submit functions and wait for it to finish
        driver.execute_async_script(f"const done = arguments[0]; {script}.then(() => done());")

    try:
        servers.append(Server(first + args, tmp_path / "server1.log"))
        url = servers[-1].url
        token = url.split("token=")[1]

        # A wrong token gets a refusal, on the page and from the API.
        driver.get(url.replace(token, "wrong"))
        assert "Wrong or missing token" in driver.find_element(By.ID, "error").text
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url.split("?")[0] + "api/state", timeout=10)
        assert refused.value.code == 403

        driver.get(url)
        round_shown(0)
        assert sorted(cards()) == ["A", "B", "C", "D"]
        shown = torch.load(out / "state.pt", weights_only=True)["shown"]
        page = cards()
        for position, name in enumerate("ABCD"):  # card X shows the candidate the permutation says
            assert page[name] == shown["texts"][shown["order"][position]]

        # Bad submissions: an error on the page, the saved session untouched, still round 0.
        before = digest(out / "state.pt")
        rank_by_clicking(["B"])
        wait.until(lambda d: error_text())
        assert "1 candidate(s), fewer than the 2" in error_text()
        for script, message in [("submitOrder([1, 1])", "candidate B is ranked twice"),
                                ("submitOrder([0, 7])", "unknown candidate position 7"),
                                ("submitRaw('{\"round\": 0, \"order\": [0,')", "malformed JSON"),
                                ("submitRaw(JSON.stringify({round: 5, order: [0, 1]}))",
                                 "round 5 is not the current round 0"),
                                ("submitOrder(['A', 'B'])", "order must be a list of display positions")]:
            call(script)
            assert message in error_text(), (script, error_text())
            assert driver.find_element(By.ID, "round").text == "Round 0"
        assert digest(out / "state.pt") == before
        assert not list(out.glob(".*.tmp"))

        # Dragging a card onto a ranked one (the page's drop handler; Selenium cannot fire native
        # drag events): B onto C takes C's rank, then A onto B swaps them.
        driver.find_element(By.ID, "clear").click()
        for name in ("C", "A"):
            driver.find_element(By.ID, f"cand-{name}").click()
        choice = lambda: driver.find_element(By.ID, "choice").text  # noqa: E731
        driver.execute_script("dropOn(1, 2)")
        assert choice().startswith("Your ranking: B > A")
        driver.execute_script("dropOn(0, 1)")
        assert choice().startswith("Your ranking: A > B")

        # Round 0 by clicking: the history names the candidate ids behind the clicked cards.
        driver.find_element(By.ID, "clear").click()
        rank_by_clicking(["C", "A"])
        round_shown(1)
        saved = json.loads((out / "history.json").read_text())
        assert saved["round"] == 1
        assert saved["history"][0]["ranking"] == [shown["order"][2], shown["order"][0]]
        assert saved["history"][0]["labels"] == ["C", "A"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#history tr.move")
        assert len(rows) == 1 and "C > A" in rows[0].text
        assert error_text() == ""

        rank_by_clicking(["D", "B"])
        round_shown(2)
        before_kill = cards()
        state_before_kill = digest(out / "state.pt")

        # Kill the server (no chance to save anything more), restart it on the same directory.
        servers[-1].kill()
        rank_by_clicking(["A", "B"])
        wait.until(lambda d: "unreachable" in error_text())
        assert digest(out / "state.pt") == state_before_kill
        servers.append(Server(args, tmp_path / "server2.log"))
        assert servers[-1].url.endswith(f"?token={token}")  # the person's URL keeps its token
        driver.get(servers[-1].url)
        round_shown(2)
        assert cards() == before_kill
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history tr.move")) == 2

        rank_by_clicking(["B", "C"])
        round_shown(3)
        saved = json.loads((out / "history.json").read_text())
        assert [h["round"] for h in saved["history"]] == [0, 1, 2]
        assert [h["labels"] for h in saved["history"]] == [["C", "A"], ["D", "B"], ["B", "C"]]
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
        for server in servers:
            server.kill()
