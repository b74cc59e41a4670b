"""Generated protobuf and gRPC stubs for the rumor.v1 wire protocol."""
