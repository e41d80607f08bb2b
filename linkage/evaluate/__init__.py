"""``hhlink evaluate``: linkage and mobility estimates against the synthetic truth."""

from linkage.evaluate.stage import evaluate

__all__ = ["evaluate"]
