"""The hub: a template packed into one verified file, moved as a file, over HTTP or via OCI."""
