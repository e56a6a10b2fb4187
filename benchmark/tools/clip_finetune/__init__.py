"""Fine-tuning a CLIP on chest X-ray image–report pairs (``vlpbench finetune-clip``).

Jang et al., "Significantly Improving Zero-Shot X-ray Pathology Classification via Fine-tuning
Pre-trained Image-Text Encoders" (Sci. Rep. 2024), name two changes to CLIP fine-tuning: random sentence
sampling and positive-pair loss relaxation. Their code and full method text are unavailable, so this is
vlpbench's documented interpretation, each part an option that can be switched off:

- random sentence sampling (:mod:`.sentences`): at every step each image is paired with one sentence
  drawn uniformly from its report's findings and impression, instead of the whole report;
- positive-pair loss relaxation (:mod:`.loss`): in the symmetric InfoNCE loss each positive cosine is
  capped at a margin, so a positive pair above the margin is no longer pulled closer (zero gradient);
- a standard loop (:mod:`.trainer`) on pairs from MIMIC-CXR-JPG or a CSV (:mod:`.pairs`), whose
  ``model.pt`` loads in the ``clip`` adapter for ``vlpbench run --model clip --task chexpert_zs``.
"""

from vlpbench.tools.clip_finetune.loss import clip_loss, relax_positives
from vlpbench.tools.clip_finetune.pairs import Pairs, csv_pairs, load_pairs, mimic_pairs
from vlpbench.tools.clip_finetune.sentences import report_text, split_sentences
from vlpbench.tools.clip_finetune.trainer import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "Pairs", "clip_loss", "csv_pairs", "finetune", "load_pairs", "mimic_pairs",
           "relax_positives", "report_text", "split_sentences"]
