"""MPDP (Model-based Planning Distilled to Policy) as a PyTorch Lightning trainer."""

__version__ = "0.1.0"
