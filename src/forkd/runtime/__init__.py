"""The engine: registry of sandboxes and snapshots, spawn/fork/branch/kill, reconcile."""
