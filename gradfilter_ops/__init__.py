"""gradfilter-ops: G-SNR data selection for instruction tuning (GradFiltering), as Data-Juicer ops.

Importing this package does not import torch; the proxy and its libraries load on first use.
"""

from .config import GSNRConfig
from .manifest import own_version
from .scorer import GSNRScorer
from .selection import select_top_k

__version__ = own_version()

__all__ = ["GSNRConfig", "GSNRScorer", "select_top_k", "__version__"]
