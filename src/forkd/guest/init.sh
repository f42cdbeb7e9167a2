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
exec switch_root /newroot /usr/bin/python3 -u /opt/forkd/agent.py --init
