"""PRD training: the TriplaneTurbo adapter trained from prompts with 2D diffusion teachers.

``PRDTrainer`` runs the unrolled four-step iteration on accelerate; ``NeuSRenderer`` and
``MeshRenderer`` render triplanes from ``sample_cameras`` over a ``LearnedBackground``; teachers
(``StableDiffusionTeacher``, ``FixedImageTeacher``, and MVDream / RichDreamer through ``recipes``)
turn renders into losses; ``Adan`` is the authors' optimiser. The command line is
``python -m triplane_turbo.train``; docs/TRAINING.md says what each recipe trains and what is left out.
"""

from .background import LearnedBackground
from .cameras import Cameras, sample_cameras
from .config import (BackgroundConfig, CameraConfig, GuidanceConfig, MeshConfig, OptimizerConfig, TrainConfig,
                     VolumeConfig)
from .mesh import MeshRender, MeshRenderer
from .optim import Adan
from .prd import PRDModel, PRDTrainer, latest_checkpoint
from .recipes import RECIPES, TeacherSpec, TeacherUnavailableError, build_teachers
from .teachers import FixedImageTeacher, Renders, StableDiffusionTeacher, Teacher
from .volume import NeuSRenderer, VolumeRender

__all__ = ["Adan", "BackgroundConfig", "CameraConfig", "Cameras", "FixedImageTeacher", "GuidanceConfig",
           "LearnedBackground", "MeshConfig", "MeshRender", "MeshRenderer", "NeuSRenderer", "OptimizerConfig",
           "PRDModel", "PRDTrainer", "RECIPES", "Renders", "StableDiffusionTeacher", "Teacher", "TeacherSpec",
           "TeacherUnavailableError", "TrainConfig", "VolumeConfig", "VolumeRender", "build_teachers",
           "latest_checkpoint", "sample_cameras"]

# Stage 2's multi-view teachers (MVDream, RichDreamer's normal-depth model) and their UNet.
from .multiview_unet import MultiViewUNet, MultiViewUNetConfig  # noqa: E402
from .mvdream import MVDreamConfig, MVDreamTeacher, PromptEncoder  # noqa: E402
from .richdreamer import RichDreamerConfig, RichDreamerTeacher  # noqa: E402

__all__ += ["MVDreamConfig", "MVDreamTeacher", "MultiViewUNet", "MultiViewUNetConfig", "PromptEncoder",
            "RichDreamerConfig", "RichDreamerTeacher"]
