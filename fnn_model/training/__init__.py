"""Training a twin on the frozen foundation core (TRAINING.md), beside the inference path and sharing its modules.

Modules: `config` (published values as dataclass defaults), `twin` (the trainable twin: frozen core and
modulation LSTM, fresh head; hashes and head state), `streams` (single-stream views sharing a stream's
parameters), `batch` (a batch of windows), `forward` (training and evaluation modes), `objective` (Poisson),
`step` (one step, the evaluation objective), `optim` (the SGD variant), `schedule` (warm-up + cosine), `ranks`
(gradient averaging over the ranks that hold a gradient) and `teacher` (planted teacher twins for tests).
"""

from fnn_model.training.batch import Batch
from fnn_model.training.config import OptimizerConfig, SamplingConfig, ScheduleConfig, TrainingConfig
from fnn_model.training.objective import NonFiniteObjectiveError, PoissonObjective
from fnn_model.training.optim import TwinSgd, build_optimizer
from fnn_model.training.ranks import average_gradients
from fnn_model.training.schedule import WarmupCosine
from fnn_model.training.step import evaluate_objective, step
from fnn_model.training.twin import Twin, build_twin

__all__ = [
    "Batch", "NonFiniteObjectiveError", "OptimizerConfig", "PoissonObjective", "SamplingConfig", "ScheduleConfig",
    "TrainingConfig", "Twin", "TwinSgd", "WarmupCosine", "average_gradients", "build_optimizer", "build_twin",
    "evaluate_objective", "step",
]
