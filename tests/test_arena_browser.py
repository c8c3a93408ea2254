"""The arena page in headless Chromium (Playwright for Python driving Debian's /usr/bin/chromium) against the arena
app under uvicorn on loopback (in a thread; tests/test_arena_load.py runs the `arena serve` process itself): a text
prompt and an image prompt, a vote and the reveal; a second vote on a battle is refused; a 50 MB upload and a script
in a prompt or an answer are handled; a half-answered battle shows progress.
Screenshots go to the test's tmp folder (printed).

Needs Debian's chromium: `make test` installs it (apt-get, as root); otherwise `apt-get install chromium`.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s tests/test_arena_browser.py
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from arena_helpers import ThreadServer, tiny_checkpoints
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    checkpoints = tiny_checkpoints(root)
    with ThreadServer(checkpoints, root / "arena") as server:
        yield server, checkpoints


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`; `make test` does it "
                    f"when run as root)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1)", pytrace=False)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                        args=ARGS, viewport={"width": 1000, "height": 760})
        yield context
        context.close()


@pytest.fixture
def page(browser, served, request):
    p = browser.new_page()
    p.goto(served[0].url + "/")
    p.wait_for_function("() => document.getElementById('n-models').textContent === '2'")
    yield p
    p.close()


def shot(page, tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def ask_and_wait(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#ask")
    page.wait_for_selector("#battle:not([hidden])")
    page.wait_for_selector(".votes button[data-choice=left]:not([disabled])", timeout=60_000)


def test_text_prompt_vote_reveal_and_a_second_vote_refused(page, served, tmp_path):
    server, checkpoints = served
    labels = [f"tiny/{c.name}" for c in checkpoints]
    ask_and_wait(page, "A red circle moves")
    before = page.content()
    assert not [x for x in labels + ["step_0000"] if x in before]  # no name before the vote
    assert page.inner_text("#answer-left") or page.inner_text("#answer-right")
    shot(page, tmp_path, "1-answers")
    page.click(".votes button[data-choice=left]")
    page.wait_for_function("() => document.getElementById('reveal-left').textContent.startsWith('A was')")
    shown = page.inner_text("#reveal-left") + page.inner_text("#reveal-right")
    assert all(x in shown for x in labels)
    assert "Vote recorded" in page.inner_text("#vote-status")
    shot(page, tmp_path, "2-reveal")
    page.evaluate("window.arenaVote('right')")  # the same battle again, through the page's own code
    page.wait_for_function("() => document.getElementById('vote-status').textContent.includes('already')")
    assert "already has your vote" in page.inner_text("#vote-status")


def test_image_prompt_and_a_probe_item(page, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (220, 40, 40)).save(buf, format="PNG")
    (tmp_path / "red.png").write_bytes(buf.getvalue())
    page.set_input_files("#file", str(tmp_path / "red.png"))
    page.wait_for_selector("#media-preview img")
    ask_and_wait(page, "Question: what colour is the shape? Answer:")
    shot(page, tmp_path, "3-image-prompt")
    page.click(".votes button[data-choice=tie]")
    page.wait_for_function("() => document.getElementById('reveal-right').textContent.startsWith('B was')")
    page.select_option("#probe", index=page.locator("#probe option").count() - 1)  # the last: an audio item
    page.wait_for_selector("#media-preview audio")
    page.fill("#prompt", "")
    page.select_option("#probe", index=1)  # an image item; its question fills the empty prompt
    page.wait_for_selector("#media-preview img")
    assert page.input_value("#prompt").startswith("Question:")
    page.click("#ask")
    page.wait_for_selector(".votes button[data-choice=both_bad]:not([disabled])", timeout=60_000)
    page.click(".votes button[data-choice=both_bad]")
    page.wait_for_function("() => document.getElementById('reveal-left').textContent.startsWith('A was')")


def test_a_50_mb_upload_is_refused_with_a_message(page, tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(50 << 20)
    page.set_input_files("#file", str(big))
    page.fill("#prompt", "what is it?")
    page.click("#ask")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('MB')", timeout=60_000)
    assert "larger than 5 MB" in page.inner_text("#message")
    shot(page, tmp_path, "4-too-large")


def test_a_script_in_a_prompt_or_an_answer_stays_text(page, tmp_path):
    attack = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    ask_and_wait(page, attack)
    page.click(".votes button[data-choice=right]")
    page.wait_for_function("() => document.getElementById('reveal-left').textContent.startsWith('A was')")
    # an answer that is markup (a model can write anything) is rendered through the page's own show()
    page.evaluate("""a => window.arenaShow({answers: [a, a], tokens: [3, 3], done: [true, true], max_tokens: 8,
                                             error: null, voted: true, reveal: null})""", attack)
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#answer-left img").count() == 0 and page.inner_text("#answer-left") == attack
    shot(page, tmp_path, "5-script-as-text")


def test_a_half_answered_battle_shows_progress_and_cannot_be_voted(page, tmp_path):
    page.evaluate("""() => { document.getElementById('battle').hidden = false;
        window.arenaShow({answers: ['A red', 'The'], tokens: [3, 1], done: [false, false], max_tokens: 8,
                          error: null, voted: false, reveal: null}); }""")
    assert page.evaluate("document.getElementById('progress-left').value") == 3
    assert page.evaluate("document.getElementById('progress-right').value") == 1
    assert page.locator(".votes button:not([disabled])").count() == 0
    assert "Answering" in page.inner_text("#vote-status")
    shot(page, tmp_path, "6-progress")
