"""Where to sparsify: layer-wise pruning ratios (ZO-GraSP, first-order GraSP, uniform)."""
from .grasp import (RATIO_METHODS, grasp_scores, layer_ratios, load_ratios, prunable, ratios_for,
                    save_ratios, uniform_ratios, zo_grasp_scores, zo_hessian_gradient)

__all__ = ["RATIO_METHODS", "grasp_scores", "layer_ratios", "load_ratios", "prunable", "ratios_for",
           "save_ratios", "uniform_ratios", "zo_grasp_scores", "zo_hessian_gradient"]
