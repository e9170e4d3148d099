"""PRD training, stage 1: the TriplaneTurbo adapter trained from prompts with 2D diffusion teachers.

``PRDTrainer`` runs the unrolled four-step iteration; ``NeuSRenderer`` and ``MeshRenderer`` render
triplanes from ``sample_cameras``; teachers (``StableDiffusionTeacher``, ``FixedImageTeacher``) turn
renders into losses. The command line is ``python -m triplane_turbo.train``; docs/TRAINING.md says
what stage 1 trains and what it leaves to stage 2.
"""

from .cameras import Cameras, sample_cameras
from .config import CameraConfig, GuidanceConfig, MeshConfig, TrainConfig, VolumeConfig
from .mesh import MeshRender, MeshRenderer
from .prd import PRDTrainer, latest_checkpoint
from .teachers import FixedImageTeacher, Renders, StableDiffusionTeacher, Teacher
from .volume import NeuSRenderer, VolumeRender

__all__ = ["CameraConfig", "Cameras", "FixedImageTeacher", "GuidanceConfig", "MeshConfig", "MeshRender", "MeshRenderer",
           "NeuSRenderer", "PRDTrainer", "Renders", "StableDiffusionTeacher", "Teacher", "TrainConfig", "VolumeConfig",
           "VolumeRender", "latest_checkpoint", "sample_cameras"]

# Stage 2's multi-view teachers (MVDream, RichDreamer's normal-depth model) and their UNet.
from .multiview_unet import MultiViewUNet, MultiViewUNetConfig  # noqa: E402
from .mvdream import MVDreamConfig, MVDreamTeacher, PromptEncoder  # noqa: E402
from .richdreamer import RichDreamerConfig, RichDreamerTeacher  # noqa: E402

__all__ += ["MVDreamConfig", "MVDreamTeacher", "MultiViewUNet", "MultiViewUNetConfig", "PromptEncoder",
            "RichDreamerConfig", "RichDreamerTeacher"]
