"""CARZero's ``CARZero_best_model.ckpt`` at random init, in the container and key names its Lightning module saves.

Built from the parameter structure of ``laihaoran/CARZero``: ``PretrainDQNWOSAMLPGLModel`` holds the model as
``self.CARZero`` (``CARZero/lightning/pretrain_model_dqn_wo_self_atten_mlp_gl.py:18``) and saves its omegaconf
config as ``hyper_parameters`` (:17; Lightning 1.1.4, requirements.txt); ``CARZeroDQNWOSAGLMLP``
(``models/CARZero_model_dqn_wo_self_atten_gl_mlp.py:22-24``) holds ``text_encoder`` (``BertEncoder`` with the
BERT as ``model``), ``img_encoder`` (``ImageEncoder`` with the ViT as ``model``; its embedders are ``Identity``)
and ``fusion_module`` (``TQN_Model``). Sizes shrink for tests: the ViT's width and depth, the BERT from a
tiny local folder (its hidden size must equal the ViT's width, as CARZero's fusion takes both).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from vlpbench.adapters.base import save_checkpoint
from vlpbench.testing import lightning_1_1_checkpoint
from vlpbench.testing.hf import tiny_bert
from vlpbench.testing.vit import MgcaVit

# configs/mimic_pretrain_llm_dqn_wo_self_atten_mlp_gl.yaml as run.py:139-165 leaves it. The list-valued train-time
# augmentations (random_affine translate/scale, color_jitter) are left out: vlpbench's omegaconf look-alike writes
# no ListConfig, and nothing reads them at inference.
CARZERO_CONFIG = {
    "experiment_name": "CARZero_Globa_local_MLP_1.0", "phase": "pretrain_llm_dqn_wo_self_atten_mlp_gl",
    "trial_name": None,
    "lightning": {
        "trainer": {"gpus": "0", "max_epochs": 15, "distributed_backend": "dp", "gradient_clip_val": 0.25,
                    "lr": 5e-05, "precision": 16, "reload_dataloaders_every_epoch": True},
        "checkpoint_callback": {"monitor": "val_loss", "dirpath": "./data/ckpt/CARZero_Globa_local_MLP_1.0/1",
                                "save_last": True, "mode": "min", "save_top_k": 1},
        "early_stopping_callback": {"monitor": "val_loss", "min_delta": 0.0, "patience": 10, "verbose": False,
                                    "mode": "min"},
        "logger": {"logger_type": "CSVLogger", "save_dir": "./data/CSV"},
    },
    "model": {
        "norm": False,
        "CARZero": {"local_loss_weight": 1.0, "global_loss_weight": 1.0, "ce_loss_weight": 1.0, "temp1": 4.0,
                    "temp2": 5.0, "temp3": 10.0},
        "vision": {"model_name": "vit_b_16", "base": "transformer", "freeze_cnn": False, "pretrained": True},
        "text": {"bert_type": "Laihaoran/BioClinicalMPBERT", "last_n_layers": 4, "aggregate_method": "sum",
                 "norm": False, "embedding_dim": 768, "freeze_bert": False, "agg_tokens": True},
        "fusion": {"d_model": 768, "H": 4, "N": 4, "dropout": 0.1, "state_prob": 1, "class_num": 1,
                   "decoder_number_layer": 4},
    },
    "data": {"dataset": "pretrain_xh", "text": {"word_num": 97, "captions_per_image": 5, "full_report": False},
             "image": {"imsize": 256}, "frac": 1.0},
    "transforms": {"norm": "CXR_MAE", "random_crop": {"crop_size": 224}, "random_horizontal_flip": 0.3},
    "train": {"update_interval": 1000, "batch_size": 256, "num_workers": 0, "nvis": 4, "rand_vis": False,
              "optimizer": {"name": "Adam", "weight_decay": 1e-06},
              "scheduler": {"name": "plateau", "monitor": "val_loss", "inerval": "epoch", "frequency": 1}},
    "extension": "1", "output_dir": "./data/output/CARZero_Globa_local_MLP_1.0/1",
}


class DecoderLayer(nn.Module):
    """``TransformerDecoderWoSelfAttenLayer``'s parameters (models/transformer_decoder.py:147-162), FFN 1024."""

    def __init__(self, width: int, heads: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(width, heads, dropout=0.1)
        self.linear1 = nn.Linear(width, ffn)
        self.dropout = nn.Dropout(0.1)
        self.linear2 = nn.Linear(ffn, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)


class TQNModel(nn.Module):
    """``TQN_Model``'s parameters (models/dqn_wo_self_atten_mlp.py:15-71): ``logit_scale``, ``decoder_norm``, a
    4-layer ``TransformerDecoder`` whose final ``norm`` is that same LayerNorm (:33-35), the "v3" ``mlp_head``."""

    def __init__(self, width: int, layers: int = 4) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder = nn.Module()
        layer = DecoderLayer(width)
        self.decoder.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))  # _get_clones
        self.decoder.norm = self.decoder_norm
        self.mlp_head = nn.Sequential(
            nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.1), nn.Linear(1024, 512), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 1))


class CARZeroModel(nn.Module):
    """``CARZeroDQNWOSAGLMLP``'s parameters: ``text_encoder.model`` (BERT), ``img_encoder.model`` (the ``MRM`` ViT,
    transformer_backbones.py:79-99: timm ``PatchEmbed`` / ``Block`` names, eps 1e-6, as ``MgcaVit``), ``fusion_module``.
    """

    def __init__(self, text_encoder: str | Path, *, width: int, depth: int, grid: int) -> None:
        super().__init__()
        self.text_encoder = nn.Module()
        self.text_encoder.model = tiny_bert(str(text_encoder))
        self.img_encoder = nn.Module()
        self.img_encoder.model = MgcaVit(width=width, depth=depth, grid=grid)
        self.fusion_module = TQNModel(width)


def carzero_state(text_encoder: str | Path, seed: int = 0, *, width: int = 768, depth: int = 12,
                  grid: int = 14) -> dict[str, torch.Tensor]:
    """The Lightning ``state_dict`` (``CARZero.``-prefixed keys) at random init under ``seed``; the caller's RNG is
    untouched. ``text_encoder``: a local BERT folder whose hidden size is ``width``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CARZeroModel(text_encoder, width=width, depth=depth, grid=grid)
    return {f"CARZero.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def write_carzero_checkpoint(path: str | Path, text_encoder: str | Path, seed: int = 0, *, width: int = 768,
                             depth: int = 12, grid: int = 14) -> Path:
    """Write ``carzero_state`` in Lightning 1.1.4's container with ``CARZERO_CONFIG`` as ``hyper_parameters``."""
    state = carzero_state(text_encoder, seed, width=width, depth=depth, grid=grid)
    return save_checkpoint(lightning_1_1_checkpoint(state, CARZERO_CONFIG), path)
