"""icefarm_worker."""
