"""The sequential-editing benchmark runner (``alphaedit-bench``); see docs/evaluation.md."""

from .methods import (BASELINE_LABELS, HOST_STEP_LABELS, AlphaEditMethod, BaselineMethod, EditMethod, MethodOptions,
                      UneditedMethod, available_methods, create_method, register_method)
from .runner import BenchConfig, BenchmarkError, BenchmarkRunner, run_benchmark

__all__ = ["BASELINE_LABELS", "HOST_STEP_LABELS", "AlphaEditMethod", "BaselineMethod", "BenchConfig", "BenchmarkError",
           "BenchmarkRunner",
           "EditMethod", "MethodOptions", "UneditedMethod", "available_methods", "create_method", "register_method",
           "run_benchmark"]
