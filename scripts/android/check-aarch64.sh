#!/usr/bin/env bash
# Runs perfx on arm64 under qemu-user and checks that its greedy reply equals the x86-64 one.
#
# Builds a Debian arm64 root with debootstrap (kept and reused), installs perfx from this tree and
# its dependencies from PyPI inside it, and runs `perfx run PROMPT --temp 0 --json` with the
# default model in four set-ups:
#
#   numpy        --device numpy, all dependencies (tokenizers, sentencepiece) installed
#   pocl         --device cpu through PoCL (Debian's pocl-opencl-icd) and pyopencl, when both install
#   pure-re      --device numpy without tokenizers, sentencepiece and regex (engine/text/bpe.py on `re`)
#   pure-regex   as pure-re, with the `regex` module installed
#
# Each reply (token ids and text) is compared with the one perfx gives on this x86-64 machine.
# Not part of CI: it needs root, network (Debian and PyPI) and 10-30 minutes.
#
# usage: sudo scripts/android/check-aarch64.sh [--root DIR] [--out DIR] [--model FILE]
#                                              [--perfx CMD] [--no-pocl]
#   --root   the arm64 root (default /var/tmp/perfx-arm64; reused when it exists)
#   --out    where the JSON replies and summary.txt go (default ./aarch64-check)
#   --model  the model file (default: the registry's default, via `perfx download`)
#   --perfx  the x86-64 perfx that gives the reference reply (default: perfx on PATH)
#   --no-pocl  skip the PoCL set-up
# Needs: debootstrap, qemu-user-static and binfmt-support (apt-get install debootstrap
# qemu-user-static binfmt-support).
set -euo pipefail

ROOT=/var/tmp/perfx-arm64
OUT=$PWD/aarch64-check
MODEL=
HOST_PERFX=${PERFX:-perfx}
POCL=1
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PROMPT="What is the capital of France?"
RUN_TIMEOUT=${RUN_TIMEOUT:-3600}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

die() { echo "check-aarch64: $*" >&2; exit 2; }
step() { echo; echo "== $* ($(date +%H:%M:%S))"; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --perfx) HOST_PERFX=$2; shift 2 ;;
        --no-pocl) POCL=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot); try sudo $0"
for tool in debootstrap qemu-aarch64-static chroot python3; do
    command -v "$tool" >/dev/null || die "$tool not found; apt-get install debootstrap qemu-user-static binfmt-support"
done
command -v "$HOST_PERFX" >/dev/null || die "x86-64 perfx '$HOST_PERFX' not found; pass --perfx /path/to/venv/bin/perfx"
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
        || die "qemu-aarch64 is not registered with binfmt_misc; apt-get install binfmt-support qemu-user-static"
fi
[ -n "$MODEL" ] || MODEL=$("$HOST_PERFX" download)
[ -f "$MODEL" ] || die "model file '$MODEL' not found"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The root trusts what this machine trusts (a proxy's own CA included) and uses its proxy settings.
ROOT_ENV=(HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
          SSL_CERT_FILE=/etc/ssl/host-ca.crt PIP_CERT=/etc/ssl/host-ca.crt)
for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!var:-}" ] && ROOT_ENV+=("$var=${!var}")
done
in_root() { chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$@"; }

mounted=()
cleanup() {
    local i
    for (( i=${#mounted[@]}-1; i>=0; i-- )); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {
    mkdir -p "$ROOT$1"
    mountpoint -q "$ROOT$1" || { mount --bind "$1" "$ROOT$1"; mounted+=("$ROOT$1"); }
}

# ---- the arm64 root -------------------------------------------------------------------------------
if [ ! -x "$ROOT/usr/bin/python3" ] || [ -d "$ROOT/debootstrap" ]; then
    if [ ! -d "$ROOT/debootstrap" ]; then
        step "debootstrap first stage: Debian $SUITE arm64 into $ROOT"
        rm -rf "$ROOT"
        debootstrap --arch=arm64 --foreign --variant=minbase \
            --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
    fi
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    step "debootstrap second stage under qemu-aarch64"
    chroot "$ROOT" /debootstrap/debootstrap --second-stage
fi
cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp -L "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/host-ca.crt"
bind /proc; bind /sys; bind /dev; bind /dev/pts
[ "$(in_root uname -m)" = aarch64 ] || die "the root does not run as aarch64 (uname -m: $(in_root uname -m))"

# ---- perfx and its dependencies -------------------------------------------------------------------
step "perfx from $REPO into /opt/venv (dependencies from PyPI)"
rm -rf "$ROOT/opt/perfx-src"
mkdir -p "$ROOT/opt/perfx-src" "$ROOT/root/perfx-home"
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=aarch64-check --exclude=.pytest_cache -cf - . | tar -C "$ROOT/opt/perfx-src" -xf -
[ -x "$ROOT/opt/venv/bin/python" ] || in_root python3 -m venv /opt/venv
PIP=(/opt/venv/bin/python -m pip install -q --disable-pip-version-check --prefer-binary)
in_root "${PIP[@]}" --upgrade --force-reinstall --no-deps /opt/perfx-src
in_root "${PIP[@]}" /opt/perfx-src
PACKAGING=ok
if ! in_root /opt/venv/bin/python -c 'import perfx.engine.backends.numpy_backend, perfx.engine.backends.opencl.devices' 2>/dev/null; then
    PACKAGING="a plain pip install lacks engine.backends (pyproject.toml's package list); installed editable instead"
    echo "check-aarch64: $PACKAGING" >&2
    in_root "${PIP[@]}" --no-deps -e /opt/perfx-src
fi
if [ ! -f "$ROOT/root/model.gguf" ] || [ "$(stat -c %s "$MODEL")" != "$(stat -c %s "$ROOT/root/model.gguf")" ]; then
    cp "$MODEL" "$ROOT/root/model.gguf"
fi

# ---- replies --------------------------------------------------------------------------------------
reply_of() {  # FILE -> "ids<TAB>text" of perfx run --json output
    python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(d["ids"], d["text"], sep="\t")' "$1"
}
device_of() {  # FILE -> the device perfx run --json reports
    python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["device"])' "$1"
}
arm_run() {  # NAME DEVICE [NOTE]: runs perfx in the root, compares with the reference, records the outcome
    local name=$1 device=$2 start=$SECONDS rc=0 got
    step "arm64 $name: perfx run --device $device"
    timeout "$RUN_TIMEOUT" chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" PERFX_HOME=/root/perfx-home \
        perfx run "$PROMPT" --temp 0 --device "$device" -m /root/model.gguf --json \
        >"$OUT/arm64-$name.json" 2>"$OUT/arm64-$name.err" || rc=$?
    if [ "$rc" != 0 ]; then
        result "$name" "FAILED (exit $rc): $(tail -n 1 "$OUT/arm64-$name.err")"; failed=1
    elif got=$(reply_of "$OUT/arm64-$name.json") && [ "$got" = "$REFERENCE" ]; then
        result "$name" "same reply ($((SECONDS - start)) s, $(device_of "$OUT/arm64-$name.json")${3:-}): ${got#*	}"
    else
        result "$name" "DIFFERENT reply: $got"; failed=1
    fi
    sed 's/^/    stderr: /' "$OUT/arm64-$name.err" | tail -n 5
}
result() { printf '%-11s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }

step "x86-64 reference: $HOST_PERFX run --device numpy"
"$HOST_PERFX" run "$PROMPT" --temp 0 --device numpy -m "$MODEL" --json >"$OUT/x86_64-numpy.json"
REFERENCE=$(reply_of "$OUT/x86_64-numpy.json")
failed=0
{
    echo "perfx check-aarch64, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "root: Debian $SUITE arm64 ($(in_root /opt/venv/bin/python -c 'import platform; print(platform.machine(), platform.python_version())')), qemu $(qemu-aarch64-static --version | head -n 1 | awk '{print $3}')"
    echo "model: $(basename "$MODEL") ($(sha256sum "$MODEL" | cut -c1-16)...)"
    echo "prompt: $PROMPT"
    echo "packaging: $PACKAGING"
    printf '%-11s %s\n' x86_64 "${REFERENCE#*	}   ids ${REFERENCE%%	*}"
} >"$OUT/summary.txt"
in_root "${PIP[@]}" tokenizers sentencepiece >/dev/null
arm_run numpy numpy

if [ "$POCL" = 1 ]; then
    step "PoCL: apt-get install pocl-opencl-icd; pip install pyopencl"
    if in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pocl-opencl-icd >/dev/null' \
            && in_root "${PIP[@]}" --only-binary=pyopencl 'pyopencl>=2024.1'; then
        arm_run pocl cpu
    else
        result pocl "not installed (apt-get or pip failed); skipped"
    fi
fi

step "pure-Python tokenizer: pip uninstall tokenizers sentencepiece regex"
in_root /opt/venv/bin/python -m pip uninstall -q -y tokenizers sentencepiece regex pyopencl 2>/dev/null || true
ABSENT=$(in_root /opt/venv/bin/python -c '
import importlib.util as u
print(" ".join(m for m in ("tokenizers", "sentencepiece", "regex", "pyopencl") if u.find_spec(m) is None))')
arm_run pure-re numpy "; absent: $ABSENT"
in_root "${PIP[@]}" regex
arm_run pure-regex numpy "; with regex"
in_root "${PIP[@]}" tokenizers sentencepiece >/dev/null

echo
cat "$OUT/summary.txt"
if [ "$failed" = 0 ]; then echo "check-aarch64: passed"; else echo "check-aarch64: FAILED"; fi
exit "$failed"
