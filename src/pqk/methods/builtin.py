"""The built-in methods: importing each method module registers it (K, P, Q, joint PQK)."""

from pqk.methods.distill import method as _distill  # noqa: F401
from pqk.methods.prune import method as _prune  # noqa: F401
from pqk.methods.quantize import method as _quantize  # noqa: F401
from pqk.methods.joint import method as _joint  # noqa: F401
from pqk.methods.clip import method as _clip  # noqa: F401 (K, P, Q of the CLIP family)
from pqk.methods.cmapkd import method as _cmapkd  # noqa: F401 (CMAPKD and its baselines, CLIP family)
from pqk.methods import cascade as _cascade  # noqa: F401 (draft + verify, DUSt3R)
from pqk.methods.rotate import method as _rotate  # noqa: F401 (Hadamard / FlatQuant transforms, DUSt3R)
from pqk.methods import teal as _teal  # noqa: F401 (TEAL activation sparsity, DUSt3R)
