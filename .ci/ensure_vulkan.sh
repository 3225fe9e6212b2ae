#!/usr/bin/env bash
# Make sure wgpu can find a Vulkan driver: on a machine without one (no GPU,
# as in CI), install Mesa's lavapipe (Vulkan on the CPU) and the loader.
set -euo pipefail
shopt -s nullglob
icds=(/usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json)
if [ ${#icds[@]} -gt 0 ] && ldconfig -p | grep -q 'libvulkan.so.1'; then
  exit 0
fi
echo "no Vulkan driver found: installing mesa-vulkan-drivers (lavapipe) and libvulkan1" >&2
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
