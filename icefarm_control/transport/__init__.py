"""Transport: the gRPC servicers, thin over the domain."""
