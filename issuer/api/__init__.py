"""The issuer's gRPC services: sidecar, admin and evidence, and their protobuf conversions."""
