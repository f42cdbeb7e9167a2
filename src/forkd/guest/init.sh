#!/bin/sh
# forkd initramfs init: load virtio + overlay, mount the read-only root under an overlay whose
# upper dir is tmpfs (guest RAM), then hand PID 1 to the forkd agent on the new root.
export PATH=/bin
fail() { echo "forkd-init: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if [ -f /modules/order ]; then
  for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" 2>/dev/null || echo "forkd-init: insmod $m failed"
  done
fi
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ "$i" -gt 1000 ] && fail "no root disk /dev/vda"
  usleep 10000
done
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,noload /dev/vda /lower || fail "cannot mount root image"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || fail "cannot mount overlay"
# forkd.net=ADDR/PREFIX,GATEWAY on the kernel command line: the template's NIC (children inherit
# the configured kernel state with their parent's RAM, so this runs once per template).
for arg in $(cat /proc/cmdline); do
  case "$arg" in forkd.net=*) net="${arg#forkd.net=}" ;; esac
done
if [ -n "$net" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 300 ]; do i=$((i + 1)); usleep 10000; done
  { ip link set eth0 up && ip addr add "${net%%,*}" dev eth0 \
    && ip route add default via "${net#*,}" dev eth0; } \
    || echo "forkd-init: eth0 configuration failed ($net)"
  # Until the host applies a sandbox's egress policy, names resolve nowhere (fail fast).
  rm -f /newroot/etc/resolv.conf /newroot/etc/hosts
  echo "nameserver 127.0.0.1" > /newroot/etc/resolv.conf
  printf '127.0.0.1 localhost\n127.0.1.1 forkd\n' > /newroot/etc/hosts
fi
mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp /newroot/run
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
ip link set lo up 2>/dev/null
hostname forkd
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# An imported OCI image brings its own environment (written quoted by forkd at build time) and
# names the interpreter that runs the agent: the image's python3, or forkd's private runtime
# (with its own loader) in an image without one.
# (Its PATH is the guest's, so the initramfs' own tools are named by path from here on.)
[ -f /newroot/opt/forkd/env ] && . /newroot/opt/forkd/env
python="/usr/bin/python3 -u"
[ -f /newroot/opt/forkd/launch ] && python="$(/bin/cat /newroot/opt/forkd/launch)"
exec /bin/switch_root /newroot $python /opt/forkd/agent.py --init
