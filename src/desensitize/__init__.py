"""desensitize: mask-based image set desensitization with recognition support (our implementation
of the approach of arXiv 2312.08975), as a DVC / Prefect / MLflow pipeline."""

__version__ = "0.1.0"
