"""Dataset fingerprint and the self-configured plan (see ``medunet.planning.plan``)."""

from medunet.planning.fingerprint import DatasetError, fingerprint_dataset
from medunet.planning.plan import Plan, PlanRequest, make_plan, plan_dataset

__all__ = ["DatasetError", "Plan", "PlanRequest", "fingerprint_dataset", "make_plan", "plan_dataset"]
