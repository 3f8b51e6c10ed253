"""kimi-rotate: pool Kimi / Moonshot API keys behind one local HTTPS proxy."""

__version__ = "0.1.0"
