"""The book as a website: it builds with warnings as errors, and every page works in a browser.

1. ``test_book_builds_with_warnings_as_errors`` builds the whole book once per test session with
   ``jupyter-book build . --warningiserror --keep-going`` into a temporary directory (broken
   cross-references, missing images, unknown citations and bad docstrings all fail it).
2. The browser tests open every page of that build in headless Chromium (driven by Selenium and
   chromedriver), served over http://127.0.0.1 from a thread, and check per page: it renders
   with its title, every image in the article has loaded with a non-zero size, chapter pages
   have a Colab launch link to the right notebook, a download link that serves it, and exercise
   solutions that stay hidden until clicked, and the browser console has no errors. Screenshots (full page, plus the first figure in dark mode)
   go to ``_build/screenshots/`` for people to look at.

The pages which the build has are the ones listed in ``_toc.yml`` when the test runs, so
chapters that are still being written are checked as soon as they are listed.

**External resources.** The pages load MathJax from a CDN (jsdelivr), and the test machines
have no internet. A failed load of a resource on another host is therefore expected here and is
not counted as a console error (it is reported in the test output instead); every other
console error, including failed loads from the local server (a missing image, script or
stylesheet of the book itself) and any JavaScript exception, fails the test. Consequently,
formulas appear as raw TeX in the screenshots taken offline; on the published site MathJax
renders them.

Chromium: ``python3 dev.py test`` only looks for it (``tools/chromium.py``); it never installs
system packages. ``.ci/run`` installs Debian's ``chromium`` and ``chromium-driver`` first. If
the browser is missing the browser tests skip with a one-line reason saying how to install it,
unless ``CI`` or ``SWA_REQUIRE_BROWSER=1`` is set, in which case they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

sys.path.insert(0, str(ROOT / "tools"))
import chromium  # noqa: E402  (tools/chromium.py, standard library only)


# --------------------------------------------------------------------------------------------
# What the book should contain
# --------------------------------------------------------------------------------------------
def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _toc_docs() -> list[str]:
    """Every document in _toc.yml (root first), as paths without suffix, e.g. 'book/01_x'."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    docs = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                docs.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return docs


def _source(doc: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (ROOT / f"{doc}{suffix}").exists():
            return ROOT / f"{doc}{suffix}"
    raise FileNotFoundError(f"{doc} is listed in _toc.yml but has no .ipynb or .md file")


def _title(doc: str) -> str:
    """The page title: the first '# ' heading of the notebook or markdown file."""
    path = _source(doc)
    if path.suffix == ".ipynb":
        text = "\n".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"
        )
    else:
        text = path.read_text()
    match = re.search(r"^# (.+)$", text, re.M)
    assert match, f"{path} has no '# Title' heading"
    return match.group(1).strip()


def _stored_figures(doc: str) -> int:
    """Image outputs stored in a chapter notebook that the page should show."""
    path = _source(doc)
    if path.suffix != ".ipynb":
        return 0
    count = 0
    for cell in json.loads(path.read_text())["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-output", "remove-cell"}:
            continue
        count += sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))
    return count


def _colab_url(doc: str) -> str:
    repo = _config()["repository"]
    owner_repo = urlparse(repo["url"]).path.strip("/")
    prefix = repo.get("path_to_book") or ""
    prefix = f"{prefix.strip('/')}/" if prefix else ""
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{repo['branch']}/{prefix}{doc}.ipynb"


DOCS = _toc_docs()
CHAPTERS = [d for d in DOCS if re.match(r"book/\d\d_", d)]


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def book_build(tmp_path_factory):
    """Build the book once per session into a temporary directory; returns (returncode, log, html)."""
    jb = Path(sys.executable).with_name("jupyter-book")
    assert jb.exists(), f"jupyter-book is not installed next to {sys.executable}"
    out = tmp_path_factory.mktemp("book")
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [str(jb), "build", str(ROOT), "--warningiserror", "--keep-going", "--path-output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    return proc.returncode, proc.stdout + proc.stderr, out / "_build" / "html"


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(book_build):
    rc, log, html = book_build
    problems = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)]
    assert rc == 0 and not problems, "the book build failed:\n" + "\n".join(problems or log.splitlines()[-40:])
    for doc in DOCS:
        assert (html / f"{doc}.html").exists(), f"{doc}.html missing from the build"


@pytest.mark.slow
def test_api_page_lists_every_public_name_and_backend(book_build):
    """The API guide is generated from the code: every public name and backend appears in it."""
    import swa_lib
    from swa_lib.backends import BACKENDS

    rc, _, html = book_build
    page = html / "book" / "api.html"
    if "book/api" not in DOCS or not page.exists():
        pytest.fail("book/api is not in _toc.yml or was not built")
    text = page.read_text()
    missing = [name for name in swa_lib.__all__ if f'id="swa_lib.{name}"' not in text]
    assert not missing, f"the API page does not document: {missing}"
    missing_backends = [name for name in BACKENDS if f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span></code>" not in text]
    assert not missing_backends, f"the backend table lacks: {missing_backends}"


# --------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="session")
def site(book_build):
    """Serve the built HTML on a free port of 127.0.0.1; yields the base URL."""
    rc, _, html = book_build
    if not (html / "index.html").exists():
        pytest.fail("the book did not build, so there is no site to open (see the build test)")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _browser_required() -> bool:
    """CI must check the site in a browser; a reader's machine without Chromium skips."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("SWA_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str):
    if _browser_required():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    found = chromium.find()
    if found is None:
        _unavailable(
            "headless Chromium is not installed, so the site was not checked in a browser: "
            "install it with `sudo python3 tools/chromium.py --install` (Debian/Ubuntu packages "
            "chromium and chromium-driver) or point SWA_CHROMIUM and SWA_CHROMEDRIVER at a browser"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("the selenium package is not installed (it is in the test extra of pyproject.toml)")
    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--metrics-recording-only", "--hide-scrollbars",
        "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _split_console(entries: list[dict]) -> tuple[list[str], list[str]]:
    """(errors that fail the test, failed loads of external resources that are tolerated)."""
    errors, external = [], []
    for entry in entries:
        if entry.get("level") != "SEVERE":
            continue
        message = entry.get("message", "")
        url = message.split(" ", 1)[0]
        host = urlparse(url).hostname
        is_network_failure = "Failed to load resource" in message or "net::ERR_" in message
        if is_network_failure and host and host not in LOCAL_HOSTS:
            external.append(message)
        elif is_network_failure and urlparse(url).path == "/favicon.ico":
            # Chromium asks every server for /favicon.ico on its own; the book links no icon,
            # so this request comes from the browser, not from the page.
            continue
        else:
            errors.append(message)
    return errors, external


def _page_ready(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # Wait until every image has finished (loaded or failed).
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)")
    )


def _full_page_screenshot(driver, path: Path, max_height: int = 12000) -> None:
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    height = int(min(max(height, 900), max_height))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _screenshot_name(doc: str) -> str:
    return doc.replace("/", "_")


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_page_in_browser(doc, site, browser):
    url = f"{site}/{doc}.html"
    browser.get_log("browser")  # drop anything left from the previous page
    browser.get(url)
    _page_ready(browser)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _full_page_screenshot(browser, SCREENSHOTS / f"{_screenshot_name(doc)}.png")

    failures = []
    # It rendered, with its title.
    title = _title(doc)
    h1 = browser.execute_script(
        "const h = document.querySelector('article h1'); return h ? h.textContent : null;"
    )
    if h1 is None:
        failures.append("no <h1> in the article: the page did not render its content")
    elif title not in h1.replace("#", "").strip():
        failures.append(f"heading is {h1.strip()!r}, expected {title!r}")
    if title not in browser.title:
        failures.append(f"window title is {browser.title!r}, expected it to contain {title!r}")

    # Its figures are shown: every image in the article loaded, with a non-zero size.
    images = browser.execute_script(
        "return Array.from(document.querySelectorAll('article img')).map(i => "
        "({src: i.currentSrc || i.src, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"
    )
    broken = [i["src"] for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    if broken:
        failures.append(f"images that did not load: {broken}")
    expected = _stored_figures(doc)
    if len(images) < expected:
        failures.append(f"the notebook stores {expected} figures but the page shows {len(images)} images")

    # It fits the column at 1280 px: nothing inside the article scrolls sideways (code, outputs,
    # tables, display math: the elements a reader would have to scroll). An element that
    # overflows is reported with a piece of its text.
    overflowing = browser.execute_script(
        "return Array.from(document.querySelectorAll('article *'))"
        ".filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1"
        "  && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))"
        ".map(e => `${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth} > ${e.clientWidth} px: `"
        "  + e.textContent.trim().slice(0, 70))"
    )
    if overflowing:
        failures.append("wider than the column (scrolls sideways):\n    " + "\n    ".join(overflowing))

    # Chapter pages: a Colab launch link to this notebook, and a download link that serves it.
    if _source(doc).suffix == ".ipynb":
        links = browser.execute_script(
            "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
        )
        colab = [h for h in links if h.startswith("https://colab.research.google.com/github/")]
        if _colab_url(doc) not in colab:
            failures.append(f"no Colab launch link to {_colab_url(doc)} (found {colab})")
        downloads = [h for h in links if h.startswith(site) and h.endswith(f"_sources/{doc}.ipynb")]
        if not downloads:
            failures.append(f"no download link to _sources/{doc}.ipynb")
        else:
            with urllib.request.urlopen(downloads[0], timeout=10) as response:
                notebook = json.loads(response.read())
            if notebook.get("cells") is None:
                failures.append(f"{downloads[0]} is not a notebook")

    # Chapter pages: exercise solutions are hidden until clicked (sphinx-togglebutton hides the
    # body of a dropdown admonition with visibility: hidden and shows it when the title is clicked).
    if doc in CHAPTERS:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        shown_js = (
            "const boxes = Array.from(document.querySelectorAll('article .admonition.dropdown'));"
            "return boxes.map(b => Array.from(b.children)"
            "  .filter(c => !c.classList.contains('admonition-title'))"
            "  .some(c => getComputedStyle(c).visibility !== 'hidden' && c.getClientRects().length > 0));"
        )
        before = browser.execute_script(shown_js)
        if not before:
            failures.append("no dropdown (hidden) solutions on a chapter page")
        elif any(before):
            failures.append(f"solutions visible before clicking: {before}")
        else:
            clicked = browser.execute_script(
                "const t = document.querySelector('article .admonition.dropdown .admonition-title');"
                "if (!t) return false; t.scrollIntoView({block: 'center'}); t.click(); return true;"
            )
            try:
                WebDriverWait(browser, 5).until(lambda d: d.execute_script(shown_js)[0])
            except TimeoutException:
                failures.append(f"clicking the first solution's title did not reveal it (clicked={clicked})")

    # Dark mode: the first figure, for a person to look at (figures have opaque backgrounds).
    if images:
        browser.execute_script(
            "document.documentElement.dataset.theme = 'dark';"
            "document.querySelector('article img').scrollIntoView({block: 'center'});"
        )
        browser.save_screenshot(str(SCREENSHOTS / f"{_screenshot_name(doc)}-dark.png"))
        browser.execute_script("document.documentElement.dataset.theme = 'light'; window.scrollTo(0, 0);")

    # No console errors (failed loads from other hosts are expected offline; see the module doc).
    errors, external = _split_console(browser.get_log("browser"))
    if external:
        print(f"{doc}: ignored {len(external)} failed external load(s) (no internet here):", *external, sep="\n  ")
    if errors:
        failures.append("console errors:\n  " + "\n  ".join(errors))

    assert not failures, f"{url}:\n- " + "\n- ".join(failures)



# --------------------------------------------------------------------------------------------
# The generators behind the API page (book/_ext/swa_api.py), tested without a build
# --------------------------------------------------------------------------------------------
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import swa_api  # noqa: E402


def test_backend_table_mirrors_the_registry():
    from swa_lib.backends import BACKENDS

    header, rows = swa_api.backend_columns()
    assert sorted(header[1:]) == sorted(f"``{name}``" for name in BACKENDS)
    by_label = {row[0]: row[1:] for row in rows}
    for column, cell in enumerate(header[1:]):
        backend = BACKENDS[cell.strip("`")]
        assert by_label["dilation"][column] == ("yes" if backend.dilation else "no")
        assert by_label["global tokens"][column] == ("yes" if backend.global_tokens else "no")
        assert by_label["sinks"][column] == ("yes" if backend.sinks else "no")
        assert by_label["autograd"][column] == ("yes" if backend.autograd else "no")
        assert by_label["``auto`` priority"][column] == str(backend.priority)


@pytest.mark.parametrize("line, expected", [
    ("value = |gradient| (log)", "value = \\|gradient\\| (log)"),
    ("holds ``|d out / d x|`` per row", "holds ``|d out / d x|`` per row"),   # inside a literal
    ("ranks   0 1 | 4 5 | 8 9", "ranks   0 1 | 4 5 | 8 9"),               # spaced pipes
    ("| a | b |", "| a | b |"),                                             # a table row
])
def test_docstring_pipes_are_escaped_only_where_rst_would_misread_them(line, expected):
    assert swa_api.escape_pipes(line) == expected


def test_every_public_submodule_is_documented():
    """The Modules section imports every public submodule; a new module appears on its own."""
    import importlib

    for name in swa_api.public_submodules():
        importlib.import_module(f"swa_lib.{name}")
    assert {"masks", "attention", "backends.reference", "backends.dense", "lab.cost"} <= set(swa_api.public_submodules())
