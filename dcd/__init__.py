"""dcd: Dynamic Contrastive Distillation of image-text retrieval cross-encoders.

``dcd.wrap(teacher, student)`` is the plug-in API; ``dcd distill`` / ``make distill`` the end-to-end job;
``dcd.Index`` (``dcd index`` / ``dcd search``) deploys a trained dual student over a FAISS index.
"""
from .distiller import DCDConfig, Distiller, wrap
from .index import Index
from .score_cache import TeacherScoreCache
from .stages import student_dir
from .trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = ["DCDConfig", "Distiller", "Index", "TeacherScoreCache", "TrainConfig", "Trainer", "student_dir", "wrap",
           "__version__"]
