"""PermuteExpertsUnpermute backends, one per file; the oracle's registry lists them."""
