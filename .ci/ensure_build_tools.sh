#!/usr/bin/env bash
# Make sure the native delegate (CMakeLists.txt) can be built: CMake >= 3.19,
# a C++17 compiler, flatc and the flatbuffers C++ headers (Debian:
# flatbuffers-compiler + libflatbuffers-dev, the same version, so the
# generated reader matches the headers). Installs what is missing via apt.
set -euo pipefail
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || missing+=(g++)
command -v flatc >/dev/null || missing+=(flatbuffers-compiler)
[ -f /usr/include/flatbuffers/flatbuffers.h ] || missing+=(libflatbuffers-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "native delegate build tools missing: installing ${missing[*]}" >&2
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
