"""Knowledge distillation (Hinton et al. 2015) into a fine-tuned student: ``post.teacher=RUN``
adds ``KL(teacher || student)`` of the temperature-scaled next-token distributions, times
``T^2`` (so its gradients keep their scale as ``T`` changes), to the method's usual loss:
``(1 - alpha) * usual + alpha * T^2 * KL`` with ``alpha = post.distill_alpha``. The KL is
averaged over the tokens the usual loss trains on. Hand-written: a few lines over lmlab's own
logits; the teacher is any lmlab run with the student's tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.data.tokenizers import Tokenizer, tokenizer_checksum
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.batches import IGNORE
from lmlab.train.run import load_trained_model


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2`` times the mean over trained positions (labels not IGNORE) of
    ``KL(softmax(teacher / T) || softmax(student / T))``."""
    mask = labels != IGNORE
    student = torch.log_softmax(student_logits.float()[mask] / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.float()[mask] / temperature, -1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / max(int(mask.sum()), 1)
    return temperature**2 * kl


def load_teacher(spec: str, student_tokenizer: Tokenizer, device: torch.device) -> LanguageModel:
    """The teacher run's newest weights, frozen (eval mode, no gradients, kept out of the
    optimiser and the checkpoints); its tokenizer must be the student's, token for token."""
    try:
        _, teacher, tokenizer, _ = load_trained_model(spec, device)
    except LmlabError as exc:
        raise LmlabError(f"post.teacher={spec}: {exc}") from None
    if tokenizer_checksum(tokenizer) != tokenizer_checksum(student_tokenizer):
        raise LmlabError(
            f"post.teacher={spec} has another tokenizer ({tokenizer.kind}, "
            f"{tokenizer.vocab_size} tokens) than the student ({student_tokenizer.kind}, "
            f"{student_tokenizer.vocab_size}); distil from a teacher trained with the same one"
        )
    teacher.requires_grad_(False)
    return teacher.eval()
