"""tallygate: an OpenAI-compatible LLM gateway with built-in telemetry."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tallygate")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
