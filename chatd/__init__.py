"""chatd: a self-hosted real-time chat daemon on Trio."""

__version__ = "0.1.0"
