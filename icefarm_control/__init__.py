"""icefarm_control."""
