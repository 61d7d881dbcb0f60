"""Privacy audits (DESIGN.md sec. 2, ``audit/``): model inversion from what the public side
sees, membership inference against M_res, and an empirical lower bound on DP-SGD's epsilon
with a gradient canary, checked against the accountant's certified value."""

from asymflow.audit.bounds import clopper_pearson, epsilon_lower_bound
from asymflow.audit.canary import CanaryAudit, SamplerSetting, audit_canary
from asymflow.audit.commands import run_canary, run_membership, run_reconstruction
from asymflow.audit.membership import AttackMetrics, MembershipResult, audit_membership
from asymflow.audit.quality import psnr, ssim
from asymflow.audit.reconstruct import ReconstructionResult, audit_reconstruction, image_grid
from asymflow.audit.views import PublicViewer, ViewSpec

__all__ = [
    "AttackMetrics",
    "CanaryAudit",
    "MembershipResult",
    "PublicViewer",
    "ReconstructionResult",
    "SamplerSetting",
    "ViewSpec",
    "audit_canary",
    "audit_membership",
    "audit_reconstruction",
    "clopper_pearson",
    "epsilon_lower_bound",
    "image_grid",
    "psnr",
    "run_canary",
    "run_membership",
    "run_reconstruction",
    "ssim",
]
