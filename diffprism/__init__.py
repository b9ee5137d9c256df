"""diffprism: multi-backend deployment exporter for diffusion pipelines."""
__version__ = "0.1.0"
