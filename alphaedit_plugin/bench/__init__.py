"""The sequential-editing benchmark runner (``alphaedit-bench``); see docs/evaluation.md."""

from .methods import AlphaEditMethod, EditMethod, MethodOptions, UneditedMethod, available_methods, create_method, register_method
from .runner import BenchConfig, BenchmarkError, BenchmarkRunner, run_benchmark

__all__ = ["AlphaEditMethod", "BenchConfig", "BenchmarkError", "BenchmarkRunner", "EditMethod", "MethodOptions",
           "UneditedMethod", "available_methods", "create_method", "register_method", "run_benchmark"]
