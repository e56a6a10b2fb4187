"""MRM (masked record modelling; Zhou et al., ICLR 2023): its ViT-B/16 image encoder on every protocol.

The published ``MRM.pth`` is MRM-pytorch's ``save_model`` container (util/misc.py:301-307): ``model`` (the
``MRM`` module's state dict), ``optimizer``, ``epoch``, ``scaler`` and ``args`` (an ``argparse.Namespace``,
read by the safe loader's allow-list). ``model`` holds (model_mrm.py:24-64, built by ``mrm()`` :244-249):

- the image encoder, timm names: ``cls_token``, ``pos_embed`` (1, 197, 768; fixed sin-cos, still saved),
  ``patch_embed.proj.*``, ``blocks.0-11.*`` (timm ``Block``: norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2), ``norm.*`` (150 keys) — loaded into a :class:`~vlpbench.adapters.transformer.ViTEncoder`;
- the MAE image decoder: ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.0-3``,
  ``decoder_norm``, ``decoder_pred`` (768 → 3072 = 32² x 3: it reconstructs the 448-pixel image) — ignored;
- the report side: ``bert_encoder.*`` (a 6-layer BERT masked-LM head conditioned on the pooled image
  latent through ``bert_mlp``) and ``bert_mlp`` — ignored: it fills masked report tokens, it does not embed
  text into a space shared with images, so MRM has no zero-shot or grounding.

Input contract: 224 pixels (the encoder sees the 448 crop resized to 224, model_mrm.py:234), grey repeated to
three channels, normalised with mean 0.4978 and std 0.2449 (main_pretrain.py:128-132; NIH_ChestX-ray/utils/
data_utils.py:24,32), not ImageNet's. Pooling: ``mean`` (the mean patch token and a new ``fc_norm``, as MRM's
fine-tuning builds it: NIH_ChestX-ray/train.py:107-110 ``global_pool=True``, models_vit.py:46-48; README's
``global_pool="avg"``); ``--model-option pool=cls`` takes the class token after ``norm`` instead.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlpbench.adapters.base import LoadReport, ModelCard, Weights, split_prefix, unwrap_state_dict
from vlpbench.adapters.transformer import ViTAdapter, match_vit

MRM_MEAN = (0.4978,) * 3
MRM_STD = (0.2449,) * 3
DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
DECODER_REASON = ("MAE image decoder (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm, "
                  "decoder_pred): reconstructs masked patches in pre-training only")
REPORT_PREFIXES = ("bert_encoder.", "bert_mlp.")
REPORT_REASON = ("MRM's report side (bert_encoder, bert_mlp): a masked-language-model head conditioned on the "
                 "image latent, no text embedding space, so no zero-shot")


class MrmAdapter(ViTAdapter):
    """MRM's ViT-B/16 (module docstring)."""

    name = "mrm"
    description = "MRM (masked record modelling) ViT-B/16: MRM.pth; frozen ViT + Feature2Pyramid, mean-token pooling"
    card = ModelCard(
        paper="Zhou et al., Advancing Radiograph Representation Learning with Masked Record Modeling (MRM), ICLR 2023",
        repository="github.com/RL4M/MRM-pytorch (model_mrm.py, NIH_ChestX-ray/models_vit.py)",
        checkpoints=("MRM.pth — Google Drive link in the repository's README (section 2)",),
        pretraining_data=("mimic_cxr",),
        notes=("the MAE decoder and the BERT report head are ignored: image encoder only, no zero-shot",
               "normalisation mean 0.4978 / std 0.2449 (grey), not ImageNet's"),
    )
    mean = MRM_MEAN
    std = MRM_STD
    default_options = {"pool": "mean"}
    procedures = {"linear": "mean patch token of the last block, then a new LayerNorm (fc_norm), as MRM's "
                            "fine-tuning (RL4M/MRM-pytorch NIH_ChestX-ray/models_vit.py:46-48, train.py:110)"}
    capability_hints = {"embed_text": "MRM's text side is a masked report model conditioned on the image, not a "
                                      "text encoder: MRM has no zero-shot or grounding"}
    checkpoint_forms = (
        "MRM.pth: {'model': MRM state dict (ViT-B/16 encoder, MAE decoder, bert_encoder, bert_mlp), 'optimizer', "
        "'epoch', 'scaler', 'args'}; decoder and report side ignored",
        "the bare 'model' state dict, keys optionally prefixed 'module.'",
    )

    @classmethod
    def map_weights(cls, checkpoint: Any, options: Mapping[str, Any]) -> Weights:
        """Unwrap ``model``, ignore the decoder and the report side, account the ViT under its timm names."""
        report = LoadReport("mrm")
        state, prefix = unwrap_state_dict(checkpoint, report, containers=("model",), what="an MRM checkpoint")
        decoder, state = split_prefix(state, *DECODER_PREFIXES)
        report.ignore(DECODER_REASON, [prefix + k for k in decoder])
        text, state = split_prefix(state, *REPORT_PREFIXES)
        report.ignore(REPORT_REASON, [prefix + k for k in text])
        return Weights(report, match_vit(state, report, source_prefix=prefix))
