"""The chat page's files (issue 15): the sizes the README reports, and the vendored
libraries pinned at one version each in update.sh, VERSIONS, the files and the README, each
with its license. No browser needed; tests/test_page.py runs the page itself."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "static"
VENDOR = STATIC / "vendor"
README = (ROOT / "README.md").read_text()

# file -> (where, the line in it that names its version, its licenses)
VENDORED = {
    "marked": (VENDOR / "marked.umd.js", r"marked v(\S+) - a markdown parser",
               ["marked.LICENSE"]),
    "dompurify": (VENDOR / "purify.min.js", r"@license DOMPurify (\S+) \|",
                  ["dompurify.LICENSE", "dompurify.LICENSE-MPL"]),
    "axe-core": (ROOT / "tests" / "vendor" / "axe.min.js", r"axe v(\S+)\n",
                 ["../../tests/vendor/axe-core.LICENSE"]),
}
README_NAMES = {"marked": "marked", "dompurify": "DOMPurify", "axe-core": "axe-core"}


def kb(n: int) -> str:
    return f"{n / 1000:.1f}"


def test_the_readme_reports_the_page_files_sizes_as_they_are() -> None:
    section = README[README.index("**Sizes**"):README.index("**Vendored libraries**")]
    section = " ".join(section.split())
    total = [0, 0]
    for i, path in enumerate(("index.html", "app.css", "app.js", "vendor/marked.umd.js",
                              "vendor/purify.min.js")):
        data = (STATIC / path).read_bytes()
        size, packed = len(data), len(gzip.compress(data, 9))
        total[0] += size
        total[1] += packed
        assert f"`{Path(path).name}` {kb(size)} / {kb(packed)}" in section, path
        if i == 2:  # the page's own files, before the vendored ones
            assert f"({kb(total[0])} / {kb(total[1])} in all)" in section
    assert f"In all {kb(total[0])} kB, {kb(total[1])} kB compressed" in section


def test_each_vendored_library_has_one_pinned_version_and_its_licenses() -> None:
    script = (VENDOR / "update.sh").read_text()
    listed = dict(line.split()[:2] for line in (VENDOR / "VERSIONS").read_text().splitlines())
    for name, (path, banner, licenses) in VENDORED.items():
        pinned = re.search(rf"^{name.upper().replace('-', '_')}=(\S+)$", script, re.M)
        assert pinned, name
        version = pinned.group(1)
        shipped = re.search(banner, path.read_text()[:2000])
        assert shipped and shipped.group(1) == version, name
        assert listed[name] == version, name
        assert re.search(rf"\[{README_NAMES[name]}\]\([^)]*\) {re.escape(version)} ", README)
        for license_file in licenses:
            assert (VENDOR / license_file).stat().st_size > 1000, license_file
