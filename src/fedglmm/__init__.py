"""fedglmm: generalized linear mixed models fitted across sites that share sums, never rows."""
from .api import fit, fit_on, fit_summaries, split_sites
from .errors import FedGLMMError, InputError
from .model.families import get_family
from .results import FitResult
from .site import SiteConfig

__all__ = ["fit", "fit_on", "fit_summaries", "split_sites", "FitResult", "FedGLMMError", "InputError", "get_family",
           "SiteConfig"]
__version__ = "0.1.0"
