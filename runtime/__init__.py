"""gblrc.runtime: ONNX Runtime sessions and the parity harness (onnxruntime + numpy only)."""

from .parity import ParityReport, check_parity, compare_outputs
from .session import default_providers, make_session, session_provider

__all__ = ["make_session", "default_providers", "session_provider", "check_parity", "compare_outputs", "ParityReport"]
