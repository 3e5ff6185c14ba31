"""icefarm_client."""
