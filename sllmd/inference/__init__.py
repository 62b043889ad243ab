"""Inference: requests and their state, the decode loop, and instances that
serve a loaded model on a worker thread (DESIGN.md section 5)."""
from .request import InferRequest, RequestState, SamplingParams

__all__ = ["InferRequest", "RequestState", "SamplingParams"]
