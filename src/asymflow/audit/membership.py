"""Membership inference against the public model M_res trained on released bits.

Setting: M_res is trained by the public side (:class:`LocalPublic`, as in Delta's stage 2) on
the released bits of its *members*. The attacker queries it on the bits of a record, released
afresh as at inference time (DESIGN.md sec. 3, "Inference": every query's residual is
sanitized with new noise), and guesses whether the record was a member. Two attacks:

- ML-Leaks (Salem, Zhang, Humbert, Berrang, Fritz, Backes, NDSS 2019, adversary 1, Sec. III):
  one shadow model, trained by the same pipeline on data disjoint from the target's but from
  the same distribution, provides labelled examples (shadow members / non-members); an attack
  classifier (an MLP with one hidden layer of 64 units) learns membership from the three
  largest posterior probabilities, sorted, and is applied to the target's posteriors.
- Loss threshold (Yeom, Giacomelli, Fredrikson, Jha, CSF 2018, Sec. 3.2, Alg. 1): guess
  "member" iff the cross-entropy loss of the true label is below the expected training loss,
  which the attacker estimates by the shadow model's mean training loss.

Each attack is scored on a balanced set (as many members as non-members): accuracy of its
decisions, ROC AUC of its scores, and the TPR at 1% FPR (Carlini et al., "Membership Inference
Attacks From First Principles", IEEE S&P 2022, Sec. III-B). With labels released in clear
(default) the audit measures what the released bits leak; label-DP would only lower it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neural_network import MLPClassifier
from torch import Tensor, nn
from torch.nn import functional

from asymflow.audit.views import PublicViewer, ViewSpec
from asymflow.delta.labels import NoisyLabels, clear_labels, randomized_response
from asymflow.models import public_model
from asymflow.public.local import LocalPublic

__all__ = [
    "AttackMetrics",
    "MembershipResult",
    "PublicTraining",
    "attack_metrics",
    "audit_membership",
    "loss_threshold_attack",
    "ml_leaks_attack",
    "posterior_features",
    "split_membership_pool",
    "tpr_at_fpr",
]

TOP_K = 3
"""ML-Leaks uses the three largest posteriors (Salem et al. 2019, Sec. III-B)."""


@dataclass(frozen=True)
class AttackMetrics:
    """Accuracy of the attack's decisions, AUC and TPR at 1% FPR of its scores (higher score
    = more likely a member), on ``members`` members and ``non_members`` non-members."""

    accuracy: float
    auc: float
    tpr_at_1pct_fpr: float
    threshold: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, fpr: float = 0.01) -> float:
    """The largest TPR of a threshold on ``scores`` whose FPR is at most ``fpr``."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must satisfy 0 <= fpr <= 1, got fpr={fpr}")
    f, t, _ = roc_curve(is_member, scores)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, threshold: float) -> AttackMetrics:
    """Score an attack that guesses "member" iff ``score >= threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(is_member).astype(bool)
    if scores.shape != member.shape or scores.ndim != 1:
        raise ValueError("scores and is_member must be 1-D arrays of the same length")
    if member.all() or not member.any():
        raise ValueError("is_member must contain both members and non-members")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    guess = scores >= threshold
    return AttackMetrics(
        accuracy=float((guess == member).mean()),
        auc=float(roc_auc_score(member, scores)),
        tpr_at_1pct_fpr=tpr_at_fpr(scores, member, 0.01),
        threshold=float(threshold),
        members=int(member.sum()),
        non_members=int((~member).sum()),
    )


def posterior_features(logits: Tensor, k: int = TOP_K) -> np.ndarray:
    """The k largest softmax probabilities, in decreasing order (ML-Leaks' attack input)."""
    probs = functional.softmax(logits.double(), dim=1)
    k = min(k, probs.shape[1])
    return probs.topk(k, dim=1).values.numpy()


def _balanced(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([a, b])
    y = np.concatenate([np.ones(len(a), dtype=bool), np.zeros(len(b), dtype=bool)])
    return x, y


def ml_leaks_attack(
    shadow_in: Tensor,
    shadow_out: Tensor,
    target_in: Tensor,
    target_out: Tensor,
    *,
    seed: int = 0,
) -> AttackMetrics:
    """ML-Leaks adversary 1 on logits (N, classes): fit the attack MLP on the shadow model's
    members/non-members, score the target's. The decision threshold is probability 1/2."""
    x_fit, y_fit = _balanced(posterior_features(shadow_in), posterior_features(shadow_out))
    attack = MLPClassifier(
        hidden_layer_sizes=(64,), max_iter=500, random_state=seed, early_stopping=False
    )
    # Centre and scale with the shadow statistics (the MLP is sensitive to feature scale).
    centre, scale = x_fit.mean(0), x_fit.std(0) + 1e-12
    with warnings.catch_warnings():
        # A few hundred shadow examples: Adam may stop at max_iter before its tolerance.
        warnings.simplefilter("ignore", ConvergenceWarning)
        attack.fit((x_fit - centre) / scale, y_fit)
    x_eval, y_eval = _balanced(posterior_features(target_in), posterior_features(target_out))
    scores = attack.predict_proba((x_eval - centre) / scale)[:, 1]
    return attack_metrics(scores, y_eval, 0.5)


def _losses(logits: Tensor, labels: np.ndarray) -> np.ndarray:
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return functional.cross_entropy(logits.double(), y, reduction="none").numpy()


def loss_threshold_attack(
    shadow_member_loss: float,
    target_in_loss: np.ndarray,
    target_out_loss: np.ndarray,
) -> AttackMetrics:
    """Yeom et al.'s attack: member iff loss <= tau, with tau = ``shadow_member_loss``, the
    shadow model's mean loss on its members. Scores are -loss, so the threshold is -tau."""
    scores, member = _balanced(-np.asarray(target_in_loss), -np.asarray(target_out_loss))
    return attack_metrics(scores, member, -float(shadow_member_loss))


@dataclass(frozen=True)
class PublicTraining:
    """How the target and shadow M_res are trained (:meth:`LocalPublic.train`)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    labels: Literal["clear", "rr"] = "clear"
    label_epsilon: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got epochs={self.epochs!r}")
        if self.labels not in ("clear", "rr"):
            raise ValueError(f"labels must be 'clear' or 'rr', got labels={self.labels!r}")


@dataclass(frozen=True)
class MembershipResult:
    """Both attacks against one view's target model, and the target's accuracy on the fresh
    queries of its members and of non-members (the generalization gap the attacks exploit)."""

    view: str
    kind: str
    epsilon: float | None
    ml_leaks: AttackMetrics
    loss: AttackMetrics
    member_accuracy: float
    non_member_accuracy: float
    members: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ml_leaks"] = self.ml_leaks.to_dict()
        out["loss"] = self.loss.to_dict()
        return out


def split_membership_pool(
    labels: np.ndarray, members: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Four disjoint index sets of size ``members`` (target_in, target_out, shadow_in,
    shadow_out), stratified by class.

    The records, grouped by class (classes in a seeded random order, records permuted within
    each class), are dealt round-robin to the four sets, so each set holds floor or ceil of
    n_c/4 of class c; each set then keeps ``members`` records taken layer by layer (the first
    record of every class, then the second, ...), so the class histograms of the four sets
    differ by at most one record per class when the pool is balanced.

    Stratification matters at audit scale: with a few hundred members, a random split leaves
    the members' class histogram a few percent off the non-members', M_res learns that prior,
    and a loss-threshold attack "finds" members by their label alone, a leak of the labels
    in clear that shrinks with the data set size and says nothing about the released bits.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ValueError(f"members must be an integer >= 2, got members={members!r}")
    if 4 * members > n:
        raise ValueError(f"members must satisfy 4 * members <= pool size {n}, got {members}")
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    sequence = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    class_position = {c: i for i, c in enumerate(classes.tolist())}
    names = ("target_in", "target_out", "shadow_in", "shadow_out")
    out = {}
    for k, name in enumerate(names):
        idx = sequence[k::4]
        position = np.array([class_position[c] for c in labels[idx].tolist()], dtype=np.int64)
        rank = np.zeros(len(idx), dtype=np.int64)  # rank of a record within its class
        for p in np.unique(position):
            mask = position == p
            rank[mask] = np.arange(int(mask.sum()))
        chosen = idx[np.lexsort((position, rank))[:members]]
        out[name] = np.sort(chosen).astype(np.int64)
    return out


def _accuracy(logits: Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


def audit_membership(
    viewer: PublicViewer,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    classes: int,
    views: Sequence[ViewSpec] = (ViewSpec("delta", 1.4),),
    members: int = 500,
    training: PublicTraining | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    seed: int = 0,
) -> list[MembershipResult]:
    """Run both attacks against the M_res of every view (``sign`` or ``delta``).

    ``images`` (uint8 NHWC) and ``labels`` form the pool, split by
    :func:`split_membership_pool`. For each view, a target and a shadow M_res (built by
    ``model_factory``, default ResNet-20 without stem at width 1/4) are trained on the released
    bits of their members; every record is then queried with freshly released bits.
    """
    training = training or PublicTraining()
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError("images and labels must have the same length")
    factory: Callable[[], nn.Module] = model_factory or partial(
        public_model, "resnet20", viewer.ir_channels, classes, width=0.25
    )
    split = split_membership_pool(labels, members, seed=seed)
    out = []
    for v_index, spec in enumerate(views):
        if not spec.releases_bits:
            raise ValueError(f"views must be 'sign' or 'delta' views, got {spec.label!r}")
        began = time.perf_counter()
        logits: dict[str, Tensor] = {}
        member_loss: dict[str, float] = {}
        for m_index, role in enumerate(("target", "shadow")):
            base = 1000 * seed + 100 * v_index + 10 * m_index
            idx_in, idx_out = split[f"{role}_in"], split[f"{role}_out"]
            released = viewer.release(images[idx_in], spec, seed=base)
            noisy = _label_release(labels[idx_in], classes, training, seed=base)
            torch.manual_seed(base)
            public = LocalPublic(
                factory,
                momentum=training.momentum,
                weight_decay=training.weight_decay,
                augment=False,
            )
            data_id = public.upload(released, noisy)
            public.train(
                data_id,
                training.epochs,
                batch_size=training.batch_size,
                lr=training.lr,
                seed=base,
            )
            # Queries: every record released afresh (new noise), as at inference time.
            logits[f"{role}_in"] = public.logits(
                viewer.release(images[idx_in], spec, seed=base + 1)
            )
            logits[f"{role}_out"] = public.logits(
                viewer.release(images[idx_out], spec, seed=base + 2)
            )
            # Yeom et al.'s tau, the expected loss of a member, as the attacker measures it:
            # the shadow model's mean loss on its own members' (fresh) queries.
            member_loss[role] = float(_losses(logits[f"{role}_in"], labels[idx_in]).mean())
        ml = ml_leaks_attack(
            logits["shadow_in"],
            logits["shadow_out"],
            logits["target_in"],
            logits["target_out"],
            seed=seed,
        )
        loss = loss_threshold_attack(
            member_loss["shadow"],
            _losses(logits["target_in"], labels[split["target_in"]]),
            _losses(logits["target_out"], labels[split["target_out"]]),
        )
        out.append(
            MembershipResult(
                view=spec.label,
                kind=spec.kind,
                epsilon=spec.epsilon,
                ml_leaks=ml,
                loss=loss,
                member_accuracy=_accuracy(logits["target_in"], labels[split["target_in"]]),
                non_member_accuracy=_accuracy(logits["target_out"], labels[split["target_out"]]),
                members=members,
                seconds=time.perf_counter() - began,
            )
        )
    return out


def _label_release(
    labels: np.ndarray, classes: int, training: PublicTraining, *, seed: int
) -> NoisyLabels:
    if training.labels == "clear":
        return clear_labels(labels, classes)
    if not (math.isfinite(training.label_epsilon) and training.label_epsilon > 0):
        raise ValueError(f"label_epsilon must be a finite number > 0, got {training.label_epsilon}")
    gen = np.random.default_rng(seed)
    return randomized_response(labels, training.label_epsilon, classes, gen)
