"""Guest images: kernel, initramfs and read-only root image, content-addressed."""
