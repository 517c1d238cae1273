"""gradfilter-ops: G-SNR data selection for instruction tuning (GradFiltering), as Data-Juicer ops.

Importing this package does not import torch; the proxy and its libraries load on first use.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import GSNRConfig
from .scorer import GSNRScorer
from .selection import select_top_k

try:
    __version__ = version("gradfilter-ops")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["GSNRConfig", "GSNRScorer", "select_top_k", "__version__"]
