"""Update rules and learning-rate schedules."""
from .rules import SGD, Adam, Momentum, Sign
from .schedules import SCHEDULES, lr_factor

UPDATES = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "sign": Sign}

__all__ = ["SGD", "Adam", "Momentum", "Sign", "UPDATES", "SCHEDULES", "lr_factor"]
