"""The settings of a run: one dataclass per component, read from nested or flat YAML, flags and
saved config.json files of any zotune version (``sections`` declares them, ``keys`` names them).

    model:  {name: smollm2-135m, trainable: lora, lora_r: 8}
    data:   {task: sst2, num_train: 1000, batch_size: 16}
    method: {name: mezo, lr: 1.0e-5, kernel: {order: 3}, pezo: {bits: 8}}
    engine: {defer_update: true}
    run:    {steps: 1000, seed: 0, output_dir: runs/sst2}

The spelling of the former flat TrainConfig (``lr: 1.0e-5``, ``kernel_order: 3``,
``--kernel-order 3``) still works: each flat name maps to one nested field.
"""
from .keys import (BY_FLAT, BY_PATH, COMMAND_LINE, LEAVES, SECTIONS, Leaf, resume_conflicts,
                   resume_keys)
from .sections import (DEFAULT_EPS, DEFAULT_LR, DTYPES, ESTIMATORS, FIXED, FREE, FZOO_STEP, OBJECTIVES,
                       PROJECTIONS, TRAINABLE, DataConfig, DiZOOptions, EngineConfig, KernelOptions,
                       MethodConfig, ModelConfig, PeZOOptions, RunConfig, TrainConfig, default_lr, setting)

__all__ = ["BY_FLAT", "BY_PATH", "COMMAND_LINE", "DEFAULT_EPS", "DEFAULT_LR", "DTYPES", "ESTIMATORS", "FIXED", "FREE",
           "FZOO_STEP", "LEAVES", "OBJECTIVES", "PROJECTIONS", "SECTIONS", "TRAINABLE", "DataConfig", "DiZOOptions",
           "EngineConfig", "KernelOptions", "Leaf", "MethodConfig", "ModelConfig", "PeZOOptions",
           "RunConfig", "TrainConfig", "default_lr", "resume_conflicts", "resume_keys", "setting"]
