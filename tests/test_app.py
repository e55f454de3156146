"""The web app (infer/app.py) on the shipped mini model: its edit function directly; the server on a
local port through gradio_client (the `edit` endpoint, a queued second request, a bad image then a
good one); and a real headless browser (Debian's chromium + chromium-driver, driven by selenium)
that uploads a mini scene, types the instruction, clicks and finds the result on the page."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dataclasses import replace
from PIL import Image

from flux_minimal.errors import FluxMinimalError

gr = pytest.importorskip("gradio", reason='the web app needs gradio: pip install ".[app]"')
from infer.app import Editor, mini_examples  # noqa: E402
from infer.options import PRESETS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "examples" / "mini" / "scene_01.png"


@pytest.fixture(autouse=True)
def _reference_moe(monkeypatch):
    # the MoE layers take their torch reference (the kernel under the interpreter is ~20x slower and
    # has its own tests in test_lora_moe_kernel.py)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def editor():
    m = PRESETS["mini"]
    return Editor(m.weights, m.lora, defaults=replace(m.edit, steps=4))


def test_edit_function_and_its_errors(editor, tmp_path):
    out, gallery, path, status = editor.edit(str(SCENE), "turn the red circle blue", seed=3)
    assert out.size == (64, 64) and gallery == [] and "NFE" in status
    saved = Image.open(path)
    assert saved.size == (64, 64) and saved.text["instruction"] == "turn the red circle blue"
    again = editor.edit(Image.open(SCENE), "turn the red circle blue", seed=3)[0]
    assert list(again.getdata()) == list(out.getdata())  # same seed, same edit
    (tmp_path / "notes.txt").write_text("not an image")
    for image, instruction, message in ((None, "x", "no source image"), (str(SCENE), "  ", "instruction is empty"),
                                        (str(tmp_path / "notes.txt"), "x", "not a readable image")):
        with pytest.raises(FluxMinimalError, match=message):
            editor.edit(image, instruction)
    with pytest.raises(FluxMinimalError, match="needs a judge"):
        editor.edit(str(SCENE), "x", candidates=3)
    assert [r[1] for r in mini_examples()][0] == "turn the red circle blue"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "infer.app", "--port", str(port)], cwd=REPO,
                            env=dict(os.environ, TRITON_INTERPRET="0"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url, t0 = f"http://127.0.0.1:{port}/", time.time()
    while time.time() - t0 < 30:  # the bar: serving within 30 s on a CPU
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the app did not serve within 30 s")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow
def test_api_edit_queue_and_bad_image(server, tmp_path):
    from gradio_client import Client, handle_file
    client = Client(server, verbose=False)
    got = Image.open(client.predict(handle_file(str(SCENE)), "turn the red circle blue", 42, api_name="/edit"))
    assert got.size == (64, 64)
    results, errors = [], []

    def call(seed):
        try:
            results.append(Image.open(Client(server, verbose=False).predict(
                handle_file(str(SCENE)), "remove the red circle", seed, api_name="/edit")).size)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=call, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and results == [(64, 64), (64, 64)]  # the second waited in the queue
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(Exception, match="cannot identify image|not a readable image"):  # gradio's check, or ours
        client.predict(handle_file(str(tmp_path / "bad.png")), "x", 1, api_name="/edit")
    assert Image.open(client.predict(handle_file(str(SCENE)), "x", 1, api_name="/edit")).size == (64, 64)


def test_in_a_real_browser(server):
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium") or shutil.which("chromium-browser")
    if not (driver_path and browser):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (.ci/run installs them: "
                    "apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=opts)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#source input[type=file]")))
        upload.send_keys(str(SCENE))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#source img")))
        driver.find_element(By.CSS_SELECTOR, "#instruction textarea").send_keys("turn the red circle blue")
        driver.find_element(By.CSS_SELECTOR, "#edit").click()
        img = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result img")))
        assert img.get_attribute("src")
        wait.until(lambda d: "NFE" in d.find_element(By.CSS_SELECTOR, "#status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history img")) == 1  # the turn is in the strip
        if shot := os.environ.get("APP_SCREENSHOT"):  # README's picture: APP_SCREENSHOT=assets/app.png
            driver.save_screenshot(shot)
        before = driver.find_element(By.CSS_SELECTOR, "#source img").get_attribute("src")
        driver.find_element(By.CSS_SELECTOR, "#keep").click()  # keep editing: the result becomes the source
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#source img").get_attribute("src") != before)
        assert not driver.find_elements(By.CSS_SELECTOR, "#figure img")  # explain is off: no figure
        driver.find_element(By.CSS_SELECTOR, "#explain input[type=checkbox]").click()
        driver.find_element(By.CSS_SELECTOR, "#edit").click()
        figure = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#figure img")))  # under the result
        assert figure.get_attribute("src")
    finally:
        driver.quit()


def test_scaling_shows_the_candidates_with_the_judges_pick_first(editor, stub):
    from tests.helpers import chat
    stub.reply = lambda body, n: (200, chat("2. The second edit follows the instruction."), 0.0)  # prefers the later one
    out, gallery, path, status = editor.edit(str(SCENE), "turn the red circle blue", seed=5, candidates=3,
                                             early_steps=1, judge_url=stub.url, judge_model="judge")
    assert out.size == (64, 64) and len(gallery) == 3 and len(stub.requests) == 2  # M - 1 comparisons
    assert gallery[0][1] == "judge's pick: seed 7" and "candidate 2 of 3 chosen" in status
    assert all(Image.open(f).size == (64, 64) for f, _ in gallery)


def test_explain_toggle_shows_the_figure_under_the_same_edit(editor):
    """The "explain" toggle: the same result as a plain edit (pixel for pixel) and the figure of
    infer/explain.py, shown under the result; off, the figure is hidden."""
    from infer.app import build
    out, figure, path, status = editor.explain(str(SCENE), "turn the red circle blue", seed=3)
    plain = editor.edit(str(SCENE), "turn the red circle blue", seed=3)[0]
    assert list(out.getdata()) == list(plain.getdata()) and Image.open(path).size == (64, 64)
    assert figure.width > 600 and "routing maps" in status
    page = build(editor)
    run = next(f.fn for f in page.fns.values() if getattr(f.fn, "__name__", "") == "run")  # the Edit button
    args = [str(SCENE), "turn the red circle blue", 3, 4, None, None, 1, 1, "", "", []]
    shown_on = run(*args, True)
    assert shown_on[6]["visible"] is True and shown_on[6]["value"].size == figure.size
    assert shown_on[5].tobytes() == out.tobytes()
    assert run(*args, False)[6]["visible"] is False
    with pytest.raises(gr.Error, match="set candidates to 1"):
        run(*args[:6], 3, *args[7:], True)
