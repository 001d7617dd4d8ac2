#!/usr/bin/env python3
"""Find, or install, the headless browser that tests/test_site.py drives.

    python3 tools/chromium.py            print what was found (exit 1 if nothing)
    python3 tools/chromium.py --install  install Debian's chromium + chromium-driver if missing
                                         (as root; .ci/run does this, the test command never does)

The site test opens the built book in headless Chromium through chromedriver (Selenium). On
Debian/Ubuntu both come from the distribution's packages ``chromium`` and ``chromium-driver``
(apt-get, as root: run it with sudo yourself). Elsewhere install Chromium or Chrome and a matching
chromedriver yourself and put them on PATH, or point ``SWA_CHROMIUM`` and ``SWA_CHROMEDRIVER`` at
them. Nothing here downloads a browser from anywhere but the system's package manager.

Standard library only, so ``dev.py`` can import it before ``.venv`` exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Optional

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DRIVER_NAMES = ("chromedriver",)
DEBIAN_PACKAGES = ("chromium", "chromium-driver")


def _first(env: str, names: tuple[str, ...], extra: tuple[str, ...] = ()) -> Optional[str]:
    explicit = os.environ.get(env)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    for path in extra:
        if os.access(path, os.X_OK):
            return path
    return None


def find() -> Optional[tuple[str, str]]:
    """``(browser, chromedriver)`` paths, or None when either is missing."""
    browser = _first("SWA_CHROMIUM", BROWSER_NAMES, ("/usr/bin/chromium", "/usr/lib/chromium/chromium"))
    driver = _first("SWA_CHROMEDRIVER", DRIVER_NAMES, ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))
    if browser and driver:
        return browser, driver
    return None


def install(quiet: bool = True) -> tuple[bool, str]:
    """Install the Debian packages with apt-get. Returns (ok, message)."""
    apt = shutil.which("apt-get")
    if apt is None:
        return False, "apt-get not found: install Chromium and chromedriver with your system's package manager"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return False, f"not root: run `sudo apt-get install -y {' '.join(DEBIAN_PACKAGES)}` (or this script with sudo)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.DEVNULL if quiet else None
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", *DEBIAN_PACKAGES]):
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, stdout=out)
        if rc != 0:
            return False, f"`{' '.join(cmd)}` failed with exit code {rc}"
    return (find() is not None), "installed" if find() else "apt-get succeeded but chromium/chromedriver are still missing"


def ensure(quiet: bool = True) -> tuple[bool, str]:
    """Find Chromium + chromedriver, installing the Debian packages if they are missing."""
    found = find()
    if found:
        return True, f"found {found[0]} and {found[1]}"
    return install(quiet=quiet)


if __name__ == "__main__":
    if "--install" in sys.argv[1:]:
        ok, message = ensure(quiet=False)
    else:
        found = find()
        ok, message = (True, f"found {found[0]} and {found[1]}") if found else (False, "chromium/chromedriver not found")
    print(message)
    sys.exit(0 if ok else 1)
