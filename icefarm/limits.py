"""Bounds shared by the worker and the client, so both refuse the same input."""

from __future__ import annotations

# The largest bitstream a worker takes (a pico2-ice bitstream is 104,090 bytes).
MAX_BITSTREAM_BYTES = 4 * 1024 * 1024
# A pico2-ice bitstream (iCE40UP5K), what the pulsecount and varmax firmware take.
PICO2_ICE_BITSTREAM_BYTES = 104090
# What a worker's gRPC server receives at most in one message: a bitstream and its envelope.
MAX_WORKER_MESSAGE_BYTES = MAX_BITSTREAM_BYTES + 64 * 1024
