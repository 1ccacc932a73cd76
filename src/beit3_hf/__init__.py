"""BEiT-3 for Hugging Face transformers.

Importing this package registers the BEiT-3 classes with the transformers Auto classes in this process, and marks
them for `save_pretrained` to copy their code into every saved folder, so that the folder also loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForMaskedImageModeling,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .models.beit3.configuration_beit3 import BEIT3_PRESETS, Beit3Config
from .models.beit3.image_processing_beit3 import Beit3ImageProcessor
from .models.beit3.modeling_beit3 import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForMaskedImageModeling,
    Beit3ForPreTraining,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3ImageTextRetrievalOutput,
    Beit3Model,
    Beit3PreTrainedModel,
)
from .models.beit3.processing_beit3 import Beit3Processor
from .models.dall_e import register as _register_dall_e
from .models.dall_e.configuration_dall_e import DallEConfig
from .models.dall_e.modeling_dall_e import DallEEncoderModel
from .models.vqkd import register as _register_vqkd
from .models.vqkd.configuration_vqkd import VqkdConfig
from .models.vqkd.modeling_vqkd import VqkdModel

__version__ = "0.1.0.dev0"

_MODEL_CLASSES = (
    Beit3Model,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3ForCaptioning,
    Beit3ForMaskedImageModeling,
    Beit3ForPreTraining,
)


def _register() -> None:
    AutoConfig.register(Beit3Config.model_type, Beit3Config, exist_ok=True)
    # AutoModel maps the config to every BEiT-3 class and picks by `config.architectures`, so a checkpoint loads as
    # its own class (no head dropped) in this process too; a bare config builds a Beit3Model.
    AutoModel.register(Beit3Config, _MODEL_CLASSES, exist_ok=True)
    AutoModelForImageClassification.register(Beit3Config, Beit3ForImageClassification, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(Beit3Config, Beit3ForImageTextRetrieval, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(Beit3Config, Beit3ForVisualQuestionAnswering, exist_ok=True)
    AutoModelForImageTextToText.register(Beit3Config, Beit3ForCaptioning, exist_ok=True)
    AutoModelForMaskedImageModeling.register(Beit3Config, Beit3ForMaskedImageModeling, exist_ok=True)
    AutoModelForPreTraining.register(Beit3Config, Beit3ForPreTraining, exist_ok=True)
    # One exact (Pillow) image processor. AutoImageProcessor resolves backend=None to "torchvision" whenever
    # torchvision is installed, so both keys name it; a "pil"-only entry logs a fallback warning on every load.
    AutoImageProcessor.register(
        Beit3Config,
        image_processor_classes={"torchvision": Beit3ImageProcessor, "pil": Beit3ImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(Beit3Config, Beit3Processor, exist_ok=True)
    Beit3ImageProcessor.register_for_auto_class("AutoImageProcessor")
    Beit3Processor.register_for_auto_class("AutoProcessor")

    Beit3Config.register_for_auto_class()
    for model_class in _MODEL_CLASSES:
        # Each class's `auto_map` entries are written by `Beit3PreTrainedModel.save_pretrained`; the Auto class here
        # only marks the class as remote code so that `save_pretrained` copies the modeling files.
        model_class.register_for_auto_class(model_class._task_auto_class or "AutoModel")


_register()
_register_vqkd()
_register_dall_e()

__all__ = [
    "BEIT3_PRESETS",
    "Beit3Config",
    "Beit3ForCaptioning",
    "Beit3ForImageClassification",
    "Beit3ForImageTextRetrieval",
    "Beit3ForMaskedImageModeling",
    "Beit3ForPreTraining",
    "Beit3ForVisualQuestionAnswering",
    "Beit3ForVisualReasoning",
    "Beit3ImageProcessor",
    "Beit3ImageTextRetrievalOutput",
    "Beit3Model",
    "Beit3PreTrainedModel",
    "Beit3Processor",
    "DallEConfig",
    "DallEEncoderModel",
    "VqkdConfig",
    "VqkdModel",
]
