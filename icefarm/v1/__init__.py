"""Generated stubs for the icefarm.v1 API (do not edit; run `make protos`)."""
