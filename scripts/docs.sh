#!/usr/bin/env bash
# Build the documentation site: sets up .venv with the docs extra (scripts/setup-env.sh docs)
# and runs `mkdocs build --strict` into site/ (git-ignored): any warning — a broken link, a
# missing page, an unresolved cross-reference — fails the build.
# Extra arguments go to `mkdocs build`, e.g. scripts/docs.sh -d /tmp/site
# To preview while writing: .venv/bin/mkdocs serve
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh docs
export NO_MKDOCS_2_WARNING=1   # silence mkdocs-material's banner about MkDocs 2.0
exec .venv/bin/mkdocs build --strict -d site "$@"
