"""kimi-rotate: pool Kimi / Moonshot API keys behind one local HTTPS proxy."""

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml and --version read it
