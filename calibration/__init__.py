"""calibration: contrastive prompts → concept pack (directions, layer selection, gate fit)."""

from calibration.calibrator import ConceptCalibrator, builtin_prompts
from calibration.gate import fit_gate
from calibration.hf_model import PRECISIONS, hf_fingerprint, load_model
from calibration.prompts import PromptFileError, PromptRecord, read_prompts, write_jsonl
from steering.conformal import conformal_threshold

__all__ = [
    "PRECISIONS",
    "ConceptCalibrator",
    "PromptFileError",
    "PromptRecord",
    "builtin_prompts",
    "conformal_threshold",
    "fit_gate",
    "hf_fingerprint",
    "load_model",
    "read_prompts",
    "write_jsonl",
]
