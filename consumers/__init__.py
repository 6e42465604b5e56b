"""What runs requests: the per-session consumer, the operation registry, the built-ins."""

from consumers.context import Context
from consumers.registry import BadArgs, Operation, OpError, Registry, op, registry

__all__ = ["BadArgs", "Context", "OpError", "Operation", "Registry", "op", "registry"]
