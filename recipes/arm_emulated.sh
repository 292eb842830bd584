#!/usr/bin/env bash
# qkv's tests on an emulated 64-bit Arm (aarch64) Linux, for a machine with no Arm CPU: a Debian
# arm64 root built by debootstrap, run by QEMU's user-mode emulator, with PyTorch's own aarch64 wheel.
# It proves the paths an Arm CPU takes (no qkv operators, PyTorch's quantised engines, Inductor's
# code for Arm), not their speed: the emulator runs ~10-20x slower than the CPU it runs on, and a
# test that compiles a program spends minutes in the emulated compiler. Session 52 found with it
# that PyTorch 2.13's aarch64 wheel starts with the quantised engine 'x86', which fails there
# (`qkv.inference.linear.int8_works` now takes the next that works).
#
#   sudo recipes/arm_emulated.sh [ROOT] [TEST ...]
#   sudo recipes/arm_emulated.sh /work/arm64 tests/test_inference.py
#   QEMU_CPUS=neoverse-n1 sudo recipes/arm_emulated.sh
#
# Each test runs once for each CPU of QEMU_CPUS (default: "neoverse-n1", NEON only, as an AWS
# Graviton2; "max,sve-default-vector-length=32", SVE of 256 bits with bf16, as a Graviton3; PyTorch
# calls the second SVE256). QEMU's own default, "max", has SVE of 512 bits, under which PyTorch's
# fp32 products (F.linear, bmm) came out wrong on the emulator (error 19 in a 7 x 64 by 64 x 96 product;
# oneDNN's right): an emulator's or OpenBLAS's fault, not chased. The default tests are those that
# train no model (under the emulator a test that trains the toy model takes many minutes); then
# recipes/arm_check.py: int8's engine, the eager engines, and the compiled step against the eager one.
#
# ROOT (default /var/tmp/qkv-arm64) gets the arm64 root (~2 GB with PyTorch and its CUDA
# libraries, which the aarch64 wheel on PyPI pulls in; `PIP_INDEX_URL` can name another index) and a
# clone of this repository's HEAD; built once (~10 minutes on a 2-core Intel Xeon), then reused:
# later runs only clone HEAD again. QKV_DATA_DIR, if set, is mounted into it. Needs root
# (debootstrap, chroot, binfmt_misc) on Debian or Ubuntu, and the network to the Debian mirror and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/var/tmp/qkv-arm64}
shift || true
tests=("$@")
if [ ${#tests[@]} = 0 ]; then
    tests=(tests/test_hardware.py tests/test_native.py tests/test_rowwise_int8.py tests/test_attention.py
        tests/test_kernels.py tests/test_inference.py)
fi
cpus=${QEMU_CPUS:-neoverse-n1 max,sve-default-vector-length=32}
system=$root/system

if ! command -v debootstrap >/dev/null || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
fi
# The kernel runs arm64 programs through QEMU once binfmt_misc knows it (a container may need the mount)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
fi

if [ ! -x "$system/venv/bin/python" ]; then
    debootstrap --arch=arm64 --include=python3,python3-venv,python3-dev,g++,ca-certificates,git \
        bookworm "$system" http://deb.debian.org/debian
    # This machine's certificates and resolver, for pip inside
    cp /etc/ssl/certs/ca-certificates.crt "$system/etc/ssl/certs/ca-certificates.crt"
    cp /etc/resolv.conf "$system/etc/resolv.conf"
    chroot "$system" python3 -m venv /venv
    chroot "$system" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} /venv/bin/pip install -q torch==2.13.0
fi

# PyTorch's CPU detection reads these; the emulator has no /sys of its own, and the host's (mounted)
# makes oneDNN's Arm code ask for registers the emulator does not give.
mkdir -p "$system/sys/devices/system/cpu"
for list in present possible online; do
    echo "0-$(($(nproc) - 1))" >"$system/sys/devices/system/cpu/$list"
done

# The emulator shows this machine's own /proc/cpuinfo; PyTorch's cpuinfo then knows no Arm core and no
# caches, and Inductor's products stop at "Expect L2_cache_size > 0". Each QEMU CPU gets the
# cpuinfo of the core it stands in for, as Linux writes it there.
arm_cpuinfo() {  # arm_cpuinfo QEMU_CPU: /proc/cpuinfo of a Neoverse N1 (NEON) or V1 (SVE)
    local features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm"
    features+=" lrcpc dcpop asimddp ssbs" part=0xd0c variant=0x3
    if [[ $1 == *sve* ]]; then
        features+=" sha3 sm3 sm4 sha512 sve asimdfhm dit uscat ilrcpc flagm paca pacg dcpodp svei8mm"
        features+=" svebf16 i8mm bf16 dgh rng" part=0xd40 variant=0x1
    fi
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 2100.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' \
            "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: 1\n\n' \
            "$variant" "$part"
    done
}

mounted=()
cleanup() {
    umount "$system/proc/cpuinfo" 2>/dev/null || true
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}" || true; done
}
trap cleanup EXIT
bind() {  # bind SOURCE TARGET: SOURCE seen at TARGET inside, until the script ends
    mkdir -p "$2"
    mount --bind "$1" "$2"
    mounted+=("$2")
}
mountpoint -q "$system/proc" || { mount -t proc proc "$system/proc" && mounted+=("$system/proc"); }
mountpoint -q "$system/dev" || bind /dev "$system/dev"
data=""
if [ -n "${QKV_DATA_DIR:-}" ]; then
    bind "$QKV_DATA_DIR" "$system/data"
    data=/data
fi

rm -rf "$system/qkv"
git clone -q "$PWD" "$system/qkv"
chroot "$system" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} /venv/bin/pip install -q -e "/qkv[dev,serve]"
status=0
for cpu in $cpus; do
    echo "== QEMU_CPU=$cpu"
    export QEMU_CPU=$cpu
    arm_cpuinfo "$cpu" >"$root/cpuinfo"
    mount --bind "$root/cpuinfo" "$system/proc/cpuinfo"
    chroot "$system" /bin/bash -c "cd /qkv && /venv/bin/python -c \
        'import platform, torch; print(platform.machine(), torch.backends.cpu.get_cpu_capability())'"
    chroot "$system" env ${data:+QKV_DATA_DIR=$data} /bin/bash -c \
        "cd /qkv && /venv/bin/python -m pytest -q -rs -p no:cacheprovider ${tests[*]}" || status=1
    chroot "$system" /bin/bash -c "cd /qkv && /venv/bin/python recipes/arm_check.py" || status=1
    umount "$system/proc/cpuinfo"
done
exit $status
