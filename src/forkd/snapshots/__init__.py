"""Templates on disk: layout, manifest, hashes, bootability, make, branch strategies."""
