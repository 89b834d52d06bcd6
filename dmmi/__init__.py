"""dmmi: referring image segmentation beyond one-to-one (DMMI network, Ref-ZOM setting)."""

from dmmi.errors import DmmiError

__version__ = "0.1.0"
__all__ = ["DmmiError", "__version__"]
