"""Every name a config group or a choice-valued key accepts: one list each, read from here.

The schemas and their checks (hrnn.config.schema), the command line's preflight (hrnn.cli.train),
the optimizer (hrnn.train.optim), resume and the HPARAMS logging (hrnn.report.tensorboard) take
the names from this module. Each option's defaults are its file conf/<group>/<name>.yaml
(tests/test_config.py checks that the files and these names agree).
"""
from __future__ import annotations

from hrnn.ops import MATMUL_PRECISIONS

# ----------------------------------------------------------------------------- config groups
# option name -> the schema of its keys (a dataclass in hrnn.config.schema)
TASKS = {"copy": "SyntheticTaskSchema", "adding": "SyntheticTaskSchema", "timescales": "TimescalesTaskSchema",
         "smnist": "MnistTaskSchema", "pmnist": "MnistTaskSchema", "text": "TextTaskSchema"}
MODELS = {"hrnn": "ClockedModelSchema", "cwrnn": "CwrnnModelSchema", "lstm": "GatedTorchModelSchema",
          "gru": "GatedTorchModelSchema", "rnn": "TorchModelSchema", "lem": "LemModelSchema", "cornn": "CornnModelSchema"}
BASES = {"binary": "BasisSchema", "dct": "BasisSchema", "logcos": "BasisSchema", "period": "PeriodBasisSchema"}
REGULARIZERS = {"softmax": "SoftmaxSchema", "l1": "L1Schema", "none": "NoRegularizerSchema"}
# option name -> its class in torch.optim; every optimizer takes the keys of schema.OptimSchema
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}

# The tasks that read files from data_dir: hrnn-train builds them before it makes a run directory.
DATA_TASKS = ("smnist", "pmnist", "text")
# The groups whose options carry a `name` key, with their names.
NAMED_GROUPS = {"task": TASKS, "model": MODELS, "basis": BASES, "regularizer": REGULARIZERS, "optim": OPTIMIZERS}
# The groups of presets: each sets keys of the groups above; null (the default) sets none.
PRESET_GROUPS = ("experiment", "hparams_search")
# The groups whose options are their files in conf/<group>/ and carry no name: the trainer's settings
# and the presets.
FILE_GROUPS = ("trainer", *PRESET_GROUPS)
# What a run's config holds, in conf/config.yaml's order.
RUN_GROUPS = (*NAMED_GROUPS, "trainer")
TOP_LEVEL = (*RUN_GROUPS, "data_dir", "resume")

# ----------------------------------------------------------------------------- choice-valued keys
SCHEDULES = ("constant", "cosine")  # optim.schedule
DEVICES = ("cpu", "cuda", "auto")  # trainer.device
NONFINITE = ("stop", "skip")  # trainer.nonfinite
PRECISIONS = MATMUL_PRECISIONS  # trainer.matmul_precision: the recurrence op's own list
CONNECTIVITY = ("full", "slow_to_fast", "learned")  # model.connectivity
ACTIVATIONS = ("clock", "event", "clock_event", "chunker")  # model.activation
GATES = ("hard", "stochastic", "soft", "annealed", "truncated")  # model.gate
CLOCK_STARTS = ("spread", "random", "uniform")  # basis.init
GATE_BIAS_INITS = {"lstm": ("chrono", "forget1", "default"), "gru": ("chrono", "default")}  # model.init
# The models that take an initial state and return their final one, so task=text can carry it across windows.
STREAM_MODELS = ("hrnn", "cwrnn", "lstm", "gru", "rnn")
