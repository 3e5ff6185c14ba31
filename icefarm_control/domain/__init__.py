"""Domain: devices, selectors, reservations; no gRPC, no HTTP."""
