"""gdeq_ext: train interatomic potentials through structure relaxations at a fraction of the memory.

A short differentiated window of relaxation steps picks the basin; an implicit (Hessian-solve) gradient
at the relaxed structure gives precision. Fused C++/CUDA kernels compute neighbor lists, message passing,
forces and Hessian-vector products; every kernel has a pure-PyTorch reference that is used, with one
warning, when the extension is not built.
"""

from gdeq_ext._extension import HAVE_EXTENSION, ExtensionVersionError, build_info
from gdeq_ext._version import __version__
from gdeq_ext.data import Batch, BatchValidationError
from gdeq_ext.datasets.silicon_defects import silicon_defects
from gdeq_ext.diagnose import diagnose
from gdeq_ext.loss import delta_q
from gdeq_ext.neighbors import edge_vectors, edge_vectors_reference, neighbor_list, neighbor_list_reference
from gdeq_ext.potentials import MLIP, MACEPotential, StillingerWeber, Transformer
from gdeq_ext.relax import BPTTRelax, HybridRelax, ImplicitRelax, RelaxResult

__all__ = [
    "HAVE_EXTENSION",
    "MLIP",
    "MACEPotential",
    "Batch",
    "BatchValidationError",
    "ExtensionVersionError",
    "StillingerWeber",
    "Transformer",
    "__version__",
    "build_info",
    "edge_vectors",
    "edge_vectors_reference",
    "neighbor_list",
    "neighbor_list_reference",
    "BPTTRelax",
    "HybridRelax",
    "ImplicitRelax",
    "RelaxResult",
    "delta_q",
]
__all__ += ["diagnose", "silicon_defects"]
