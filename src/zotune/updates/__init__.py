"""Update rules, gradient transforms and learning-rate schedules."""
from .rules import SGD, Adam, LinearCoupling, Momentum, Shift, Sign
from .schedules import SCHEDULES, lr_factor
from .transforms import ClipTensorNorm, Normalize, ScalarSign, chain

UPDATES = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "sign": Sign, "agd": LinearCoupling}

__all__ = ["SGD", "Adam", "LinearCoupling", "Momentum", "Shift", "Sign", "UPDATES", "SCHEDULES", "lr_factor",
           "ClipTensorNorm", "Normalize", "ScalarSign", "chain"]
