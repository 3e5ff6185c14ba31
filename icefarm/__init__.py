"""iCEFARM's shared parts: the generated API stubs (`icefarm.v1`), states, limits, tokens, logs.

The distribution is `icefarm-grpc` (the name `icefarm` on the package index is another project).
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "icefarm-grpc"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
