"""forkd: copy-on-write microVM sandboxes for AI-agent fan-out."""

__version__ = "0.6.0"
API_VERSION = "v1"
