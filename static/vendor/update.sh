#!/usr/bin/env bash
# Refreshes the vendored third-party files of the chat page from the npm registry.
#
# The page has no build step: these files are copied verbatim from the packages' published
# tarballs (`npm pack`), next to their licenses. To update, change a version below, run
#     bash static/vendor/update.sh
# from anywhere, read the libraries' changelogs, run the browser tests (tests/test_page.py)
# and commit the changed files together with this script.
#
#   marked     Markdown to HTML (the answers)                       static/vendor/
#   dompurify  HTML sanitizer (model output is untrusted)           static/vendor/
#   axe-core   accessibility checks, for the tests only             tests/vendor/
set -euo pipefail

MARKED=18.3.0
DOMPURIFY=3.5.0
AXE_CORE=4.14.1

here="$(cd "$(dirname "$0")" && pwd)"
tests_vendor="$here/../../tests/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

unpack() {  # unpack NAME VERSION: the package's files under $work/NAME/package
    (cd "$work" && npm pack --silent "$1@$2" >/dev/null)
    mkdir -p "$work/$1"
    tar -xzf "$work/$1-$2.tgz" -C "$work/$1"
}

unpack marked "$MARKED"
cp "$work/marked/package/lib/marked.umd.js" "$here/marked.umd.js"
cp "$work/marked/package/LICENSE" "$here/marked.LICENSE"

unpack dompurify "$DOMPURIFY"
cp "$work/dompurify/package/dist/purify.min.js" "$here/purify.min.js"
cp "$work/dompurify/package/LICENSE" "$here/dompurify.LICENSE"        # Apache-2.0, or:
cp "$work/dompurify/package/LICENSE-MPL" "$here/dompurify.LICENSE-MPL"  # MPL-2.0

unpack axe-core "$AXE_CORE"
mkdir -p "$tests_vendor"
cp "$work/axe-core/package/axe.min.js" "$tests_vendor/axe.min.js"
cp "$work/axe-core/package/LICENSE" "$tests_vendor/axe-core.LICENSE"

cat > "$here/VERSIONS" <<LIST
marked $MARKED
dompurify $DOMPURIFY
axe-core $AXE_CORE (tests/vendor)
LIST
echo "vendored: marked $MARKED, dompurify $DOMPURIFY, axe-core $AXE_CORE"
