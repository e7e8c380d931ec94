#!/usr/bin/env bash
# jobs/setup.sh [--slurm] - prepare a fresh Debian/Ubuntu machine for skinhpc (root or sudo).
#
#   1. apt packages, each only when missing: build deps of FFCV's C extension (pkg-config,
#      libturbojpeg0-dev, libopencv-dev), its runtime libraries BY NAME (libturbojpeg0,
#      libopencv-core406, libopencv-imgproc406: marked manually installed, so an `apt-get autoremove`
#      elsewhere cannot take them and break `import ffcv`), a C++ compiler (DeepSpeed builds its
#      CPU communication op at run time) and python3-venv/python3-dev.
#      --slurm: also the packages of the local test cluster (slurm/local/start.sh installs them too).
#   2. .venv (python3 -m venv) with torch==2.14.1 torchvision==0.29.1 first (pinned, so that the
#      editable install below does not pull another torch), then `pip install -e '.[test]'`.
# Idempotent and quick when everything is present: pip runs again only when pyproject.toml changed
# since the last successful run (stamp file .venv/.skinhpc-setup) or torch is not the pinned one.
# pip's own configuration (index, find-links) is used as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
TORCH_PIN=2.14.1
VISION_PIN=0.29.1
log() { echo "[jobs/setup.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

WITH_SLURM=0
for arg in "$@"; do
  case $arg in
    --slurm) WITH_SLURM=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (usage: bash jobs/setup.sh [--slurm])" ;;
  esac
done

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "apt packages need root: run as root or install sudo"
  SUDO=(sudo)
fi

# ---------------------------------------------------------------- 1. apt packages (only missing ones)
PKGS=(pkg-config libturbojpeg0-dev libopencv-dev libturbojpeg0 libopencv-core406 libopencv-imgproc406
      g++ python3-venv python3-dev)
[ "$WITH_SLURM" = 1 ] && PKGS+=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
MISSING=()
for p in "${PKGS[@]}"; do installed "$p" || MISSING+=("$p"); done
if [ "${#MISSING[@]}" -gt 0 ]; then
  log "apt-get install ${MISSING[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${MISSING[@]}"
fi
# Explicitly installed => never autoremoved (also when they came in as dependencies before).
"${SUDO[@]}" apt-mark manual libturbojpeg0 libopencv-core406 libopencv-imgproc406 >/dev/null

# ---------------------------------------------------------------- 2. virtual environment
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
STAMP=.venv/.skinhpc-setup
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==$TORCH_PIN torchvision==$VISION_PIN $REPO"
have_torch() {  # installed versions from the metadata: no slow torch import
  "$PY" -c "import sys; from importlib.metadata import version as v; sys.exit(not (v('torch').split('+')[0] == '$TORCH_PIN' and v('torchvision').split('+')[0] == '$VISION_PIN'))" 2>/dev/null
}
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && have_torch \
   && "$PY" -c "import sys, importlib.util as u; sys.exit(not all(u.find_spec(m) for m in ('skinhpc', 'ffcv', 'submitit', 'pytest')))" 2>/dev/null; then
  log "environment up to date ($PY)"
  exit 0
fi
if ! have_torch; then
  log "pip install torch==$TORCH_PIN torchvision==$VISION_PIN"
  "$PY" -m pip install -q "torch==$TORCH_PIN" "torchvision==$VISION_PIN"
fi
log "pip install -e '.[test]'"
"$PY" -m pip install -q -e '.[test]'
"$PY" -c "import skinhpc, ffcv, submitit, torch; print('skinhpc ready: torch', torch.__version__)"
echo "$WANT" >"$STAMP"
