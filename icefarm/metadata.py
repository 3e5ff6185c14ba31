"""gRPC metadata keys every part of iCEFARM agrees on (no dependencies: the client imports it)."""

# Metadata key under which a client sends its reservation token to a worker.
TOKEN_METADATA_KEY = "icefarm-reservation-token"

# Metadata key naming one call (and its retries) in the control's and the worker's logs.
REQUEST_ID_HEADER = "x-request-id"
