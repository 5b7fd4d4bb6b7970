"""Shared fixtures: one Tansu broker per session, test models built once and cached.

The fixtures live in ``tests/support`` (on sys.path through pytest's
``pythonpath`` setting) so that benchmarks can reuse the builders.
"""

import os

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many daemons run in one test session, some at once: each takes a free port for
# its HTTP endpoints (the operator's default is 8080).
os.environ["DISTILLD_HTTP_PORT"] = "0"

pytest_plugins = ["support.kafka", "support.logs", "support.models", "support.vllm"]
