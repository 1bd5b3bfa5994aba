"""MONAI bundles: build from a run, verify offline, list, and the components their configs use."""

from medunet.bundle.build import ModelCard, build_bundle, load_card
from medunet.bundle.verify import BundleInfo, list_bundles, schema_path, verify_bundle

__all__ = ["BundleInfo", "ModelCard", "build_bundle", "list_bundles", "load_card", "schema_path", "verify_bundle"]
