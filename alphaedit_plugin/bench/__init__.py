"""The sequential-editing benchmark runner (``alphaedit-bench``); see docs/evaluation.md."""

from .methods import (BenchMethod, MethodOptions, RegisteredMethodRun, UneditedMethod, available_methods,
                      create_method)
from .runner import BenchConfig, BenchmarkError, BenchmarkPaused, BenchmarkRunner, run_benchmark

__all__ = ["BenchConfig", "BenchMethod", "BenchmarkError", "BenchmarkPaused", "BenchmarkRunner", "MethodOptions",
           "RegisteredMethodRun", "UneditedMethod", "available_methods", "create_method", "run_benchmark"]
