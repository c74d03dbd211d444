"""The DINO recipe's pieces against independent computations: losses, centering, head, masks, schedules,
the token forward, and the collapse monitors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geo_dino.models.backbone import build_backbone
from geo_dino.training.dino import (
    DINOHead,
    DINOLoss,
    IBOTPatchLoss,
    collapse_monitors,
    collapse_warnings,
    cosine_schedule,
    gram_loss,
    koleo_loss,
    random_masks,
    teacher_temp_schedule,
    tokens,
)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dino_loss_matches_the_papers_formula_and_skips_same_view_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, n_crops = 5, 16, 4
    student = [torch.randn(b, k, generator=g) for _ in range(n_crops)]
    teacher = [torch.randn(b, k, generator=g) for _ in range(2)]
    loss = DINOLoss(k, student_temp=0.1)
    loss.center.copy_(torch.randn(1, k, generator=g))
    temp = 0.04
    probs = [loss.teacher_probs(t, temp) for t in teacher]
    got = float(loss(student, probs))
    c = loss.center.numpy()
    terms = []
    for iq in range(2):
        q = _np_softmax((teacher[iq].numpy() - c) / temp)
        for v in range(n_crops):
            if v == iq:
                continue
            logp = np.log(_np_softmax(student[v].numpy() / 0.1))
            terms.append(float((-q * logp).sum(-1).mean()))
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    assert len(terms) == 2 * n_crops - 2


def test_center_update_is_an_ema_of_the_batch_mean() -> None:
    loss = DINOLoss(8, center_momentum=0.9)
    loss.center.fill_(1.0)
    t = torch.arange(24, dtype=torch.float32).view(3, 8)
    loss.update_center(t)
    expected = 0.9 * 1.0 + 0.1 * t.mean(0, keepdim=True)
    assert torch.allclose(loss.center, expected)


def test_dino_head_last_layer_is_weight_normalised_with_a_frozen_unit_gain() -> None:
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(10, 32)
    out = head(x)
    assert out.shape == (10, 100)
    # bottleneck is L2-normalised and every prototype has norm 1, so each logit is a cosine in [-1, 1]
    assert float(out.detach().abs().max()) <= 1.0 + 1e-5
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(100), atol=1e-5)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad
    free = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_ibot_loss_reads_only_masked_patches_and_weights_images_equally() -> None:
    g = torch.Generator().manual_seed(1)
    b, n, k = 3, 10, 12
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks[0, :1] = True  # one masked patch
    masks[1, :8] = True  # eight masked patches
    m = int(masks.sum())
    s = torch.randn(m, k, generator=g)
    t = F.softmax(torch.randn(m, k, generator=g), -1)
    loss = IBOTPatchLoss(k)
    got = float(loss(s, t, masks))
    per_token = (-t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (per_token[:1].mean() + per_token[1:].mean() + 0.0) / 3  # image 2 has no masked patch
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_koleo_matches_brute_force_and_rewards_spread() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 8, generator=g)
    xn = F.normalize(x, dim=-1).numpy()
    d = np.linalg.norm(xn[:, None] - xn[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = -np.log(d.min(1) + 1e-8).mean()
    assert float(koleo_loss(x)) == pytest.approx(expected, rel=1e-4)
    clustered = torch.randn(20, 8, generator=g) * 0.01 + 5.0
    assert float(koleo_loss(clustered)) > float(koleo_loss(x)) + 1.0


def test_gram_loss_is_zero_for_equal_features_scale_invariant_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 9, 6, generator=g)
    assert float(gram_loss(a, a.clone())) == pytest.approx(0.0, abs=1e-10)
    assert float(gram_loss(a, 3.0 * a)) == pytest.approx(0.0, abs=1e-10)  # normalised features
    b = torch.randn(2, 9, 6, generator=g)
    s, t = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    expected = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean()
    assert float(gram_loss(a, b)) == pytest.approx(float(expected), rel=1e-5)
    assert float(gram_loss(a, b)) > 0.01


def test_random_masks_follow_probability_and_ratio_and_are_reproducible() -> None:
    m1 = random_masks(40, (8, 8), (0.1, 0.5), 0.5, torch.Generator().manual_seed(4))
    m2 = random_masks(40, (8, 8), (0.1, 0.5), 0.5, torch.Generator().manual_seed(4))
    m3 = random_masks(40, (8, 8), (0.1, 0.5), 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    per_image = m1.sum(1)
    masked = per_image[per_image > 0]
    assert len(masked) == 20
    assert int(masked.min()) >= round(64 * 0.1) - 1 and int(masked.max()) <= round(64 * 0.5) + 1


def test_schedules_warm_up_then_follow_a_cosine() -> None:
    s = cosine_schedule(1.0, 0.1, 100, warmup=10, start=0.0)
    assert len(s) == 100
    assert s[0] == 0.0 and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)
    assert s[-1] == pytest.approx(0.1, abs=1e-3)
    t = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07) and np.all(t[30:] == 0.07)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_dinov3_test", "vit_tiny_patch14_reg4_dinov2_test",
                                  "vit_tiny_patch14_dinov2_test"])
def test_token_forward_equals_timm_and_drops_registers(arch: str) -> None:
    model, spec = build_backbone(arch)
    p = spec.patch_size
    x = torch.randn(2, 3, 4 * p, 3 * p)
    with torch.no_grad():
        cls, patches = tokens(model, x)
        ref = model.forward_features(x)
    assert patches.shape == (2, 12, spec.embed_dim)  # registers never read as patches
    assert torch.allclose(cls, ref[:, 0], atol=1e-6)
    assert torch.allclose(patches, ref[:, model.num_prefix_tokens:], atol=1e-6)


def test_masked_patches_are_replaced_before_the_blocks() -> None:
    model, spec = build_backbone("vit_tiny_patch16_dinov3_test")
    token = torch.randn(spec.embed_dim)
    x1, x2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    every = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        a = tokens(model, x1, every, token)
        b = tokens(model, x2, every, token)
        c = tokens(model, x1, torch.zeros(1, 4, dtype=torch.bool), token)
    # with every patch masked the image no longer matters; with none masked it does
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
    assert not torch.allclose(a[1], c[1], atol=1e-4)
    with pytest.raises(ValueError, match="mask_token"):  # a raised error, not an assert (gone under -O)
        tokens(model, x1, every)


def test_dino_loss_without_a_pair_of_views_is_a_clear_error() -> None:
    loss = DINOLoss(8)
    q = torch.softmax(torch.randn(4, 8), -1)
    with pytest.raises(ValueError, match="different student view"):
        loss([torch.randn(4, 8)], [q])  # one view: no teacher/student pair of different views


def test_collapse_monitors_flag_each_kind_of_collapse_and_not_healthy_training() -> None:
    g = torch.Generator().manual_seed(6)
    k, b = 64, 32
    feats = torch.randn(b, 16, generator=g)
    # healthy: sharp, varied teacher; student close to it; varied features
    t_logits = torch.randn(b, k, generator=g) * 5
    q = F.softmax(t_logits, -1)
    healthy = collapse_monitors(t_logits * 0.1 + 0.1 * torch.randn(b, k, generator=g), q, 0.1, feats, k)
    assert collapse_warnings(healthy) == []
    # every image on the same prototype
    one = torch.zeros(b, k)
    one[:, 3] = 1.0
    m = collapse_monitors(torch.randn(b, k, generator=g), one, 0.1, feats, k)
    assert any("few prototypes" in w for w in collapse_warnings(m))
    # uniform teacher matched by the student
    uniform = torch.full((b, k), 1.0 / k)
    m = collapse_monitors(torch.zeros(b, k), uniform, 0.1, feats, k)
    assert m["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    assert any("uniform" in w for w in collapse_warnings(m))
    # constant features
    m = collapse_monitors(t_logits, q, 0.1, torch.ones(b, 16) + 1e-7 * torch.randn(b, 16, generator=g), k)
    assert any("nearly constant" in w for w in collapse_warnings(m))
