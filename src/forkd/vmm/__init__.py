"""One QEMU process: machine spec -> argv, start, QMP, migrate, stop, kill."""
