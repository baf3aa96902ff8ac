"""Integer-only training: the INT8 number format, integer layers and ElasticZO-INT8."""
from .elasticzo_int8 import ElasticZOInt8, Int8Config, build_elasticzo_int8
from .layers import IntSequential

__all__ = ["ElasticZOInt8", "Int8Config", "IntSequential", "build_elasticzo_int8"]
