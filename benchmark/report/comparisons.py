"""Named comparison sets: the columns and models of the comparisons that 2025-26 papers draw.

``table --group foundation`` and ``table --group zero-shot-2025`` lay out the records of a comparison's
tasks in its column order; every model with records on those tasks is a row (a new checkpoint sits beside
the baselines), and a note under the table names the comparison's models that have no record yet, so a
missing baseline is visible rather than silently absent. Published rows (``--reference``) show where a
shipped reference file has a column of the comparison's tasks, under the usual rule: only beside records
of the profile and metric they were computed with.

A comparison is a choice of tasks and models, not a protocol: each cell is still the task's own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Comparison:
    """One named comparison: ``tasks`` in column order, the training ``fracs`` shown, the adapters that
    the comparison sets side by side (``models``) and where that set of models and datasets comes from."""

    name: str
    title: str
    tasks: tuple[str, ...]
    fracs: tuple[float, ...]
    models: tuple[str, ...]
    sources: str


COMPARISONS: dict[str, Comparison] = {c.name: c for c in (
    Comparison(
        name="foundation",
        title="CXR foundation encoders: linear probe and frozen-encoder dense transfer",
        tasks=("vindr_cls", "rsna_cls", "chexpert_cls", "tbx11k_cls", "covidx_cls",
               "siim_seg", "rsna_seg", "tbx11k_seg", "vindr_det"),
        fracs=(0.01, 0.1, 1.0),
        models=("rad_dino", "medsiglip", "biomedclip", "ark", "xraysiglip", "clip", "mrm", "g2d"),
        sources="the encoders and datasets of gary8564/rad_dino's benchmark (RAD-DINO, MedSigLIP, BiomedCLIP, "
                "Ark+, the CheXagent encoders; VinDr-CXR, RSNA, TBX11K, COVIDx), FairMedFM (CheXpert) and BenchX "
                "(SIIM, RSNA and TBX11K segmentation, VinDr-CXR), beside a VLP encoder of the G2D tables"),
    Comparison(
        name="zero-shot-2025",
        title="Zero-shot classification and grounding: MedKLIP / KAD and their successors",
        tasks=("chexpert_zs", "cxr14_zs", "padchest_zs", "rsna_zs", "siim_zs",
               "chexlocalize_ground", "rsna_ground", "ms_cxr_ground"),
        fracs=(1.0,),
        models=("clip", "biovil", "medklip", "kad", "mavl", "carzero", "medsiglip", "xraysiglip", "biomedclip"),
        sources="the zero-shot tables of MAVL (CVPR 2024: CheXpert, ChestX-ray14, PadChest, RSNA, SIIM), CARZero "
                "(CVPR 2024: ChestX-ray14, CheXpert, PadChest) and RadZero (NeurIPS 2025: classification and "
                "grounding), with CheXlocalize's pixel masks for grounding"),
)}


def comparison_notes(chosen: Comparison, records: list[dict]) -> list[str]:
    """What a table of ``chosen`` says under it: the comparison, its sources, and which of its models and
    tasks the records do not cover (each a run still to do, not a zero)."""
    adapters = {(r.get("model") or {}).get("adapter") for r in records}
    tasks = {(r.get("task") or {}).get("name") for r in records}
    notes = [f"Comparison {chosen.name}: {chosen.title}; after {chosen.sources}."]
    missing_models = [m for m in chosen.models if m not in adapters]
    if missing_models:
        notes.append(f"Models of the comparison without records here: {', '.join(missing_models)} "
                     "(`vlpbench run --model NAME ...` adds them).")
    missing_tasks = [t for t in chosen.tasks if t not in tasks]
    if missing_tasks:
        notes.append(f"Tasks of the comparison without records here: {', '.join(missing_tasks)}.")
    return notes
