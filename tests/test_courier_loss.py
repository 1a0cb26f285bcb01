"""COURIER loss, reconstruction, distributed normalisation and image encoder (CPU, fast).

The loss is checked against a deliberately slow reference written with Python loops, one scalar at a
time (cosines, softmax denominators, -log p), for every ablation switch; the two-process gloo test
checks the distributed convention documented in training/courier.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from conftest import gloo_ranks_may_abort

from training.baselines import (
    CategoryClassifier,
    SimSiamPredictor,
    augment,
    nt_xent_loss,
    simsiam_loss,
    supervised_loss,
)
from training.courier import (
    CourierLoss,
    CourierLossConfig,
    CourierModel,
    ImageEncoder,
    courier_loss,
    reconstruct,
)
from training.distributed import world_size

DT = torch.float64


# --------------------------------------------------------------------------------------------------
# Slow, obviously-correct reference (scalars and loops only)
# --------------------------------------------------------------------------------------------------
def dot(a, b):
    s = a[0] * b[0]
    for i in range(1, len(a)):
        s = s + a[i] * b[i]
    return s


def cos(a, b):
    return dot(a, b) / (torch.sqrt(dot(a, a)) * torch.sqrt(dot(b, b)))


def axpy_sum(weights, vectors):  # sum_k w_k v_k, element by element
    d = len(vectors[0])
    return [sum(weights[k] * vectors[k][i] for k in range(len(vectors))) for i in range(d)]


def softmax(scores):
    m = max(float(s.detach()) for s in scores)
    ex = [torch.exp(s - m) for s in scores]
    z = sum(ex)
    return [e / z for e in ex]


def matvec(w, b, x):  # w (out, in) tensor, b (out,), x list of scalars
    return [b[o] + sum(w[o, i] * x[i] for i in range(len(x))) for o in range(w.shape[0])]


def ref_reconstruct(target, clicks, mode, mha):
    """target: list of d scalars; clicks: list of real click vectors (lists of scalars)."""
    if mode == "attention":
        alpha = softmax([dot(target, c) for c in clicks])
        return axpy_sum(alpha, clicks)
    if mode == "self_attention":
        hs = [axpy_sum(softmax([dot(q, c) for c in clicks]), clicks) for q in clicks]
        return [sum(h[i] for h in hs) / len(hs) for i in range(len(target))]
    assert mode == "multihead"
    d = len(target)
    W, bias = mha.in_proj_weight, mha.in_proj_bias
    q = matvec(W[:d], bias[:d], target)
    ks = [matvec(W[d:2 * d], bias[d:2 * d], c) for c in clicks]
    vs = [matvec(W[2 * d:], bias[2 * d:], c) for c in clicks]
    h, dh = mha.num_heads, d // mha.num_heads
    out = []
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        alpha = softmax([dot(q[sl], k[sl]) / math.sqrt(dh) for k in ks])
        out += axpy_sum(alpha, [v[sl] for v in vs])
    return matvec(mha.out_proj.weight, mha.out_proj.bias, out)


def ref_term(targets, labels, tmask, hists, hmasks, cfg, mha):
    """One L_contrast term over the (global) batch. targets[b][j] vectors, hists[b][k] vectors."""
    items = [(b, j) for b in range(len(targets)) for j in range(len(targets[b]))]
    denom_items = [(b, j) for (b, j) in items if tmask[b][j] and (cfg.use_negatives or labels[b][j])]
    total, n = 0.0, 0
    for (b, j) in items:
        clicks = [hists[b][k] for k in range(len(hists[b])) if hmasks[b][k]]
        if not (labels[b][j] and tmask[b][j] and clicks):
            continue
        r = ref_reconstruct(targets[b][j], clicks, cfg.reconstruction, mha)
        if cfg.use_contrast:
            num = torch.exp(cos(targets[b][j], r) / cfg.tau)
            den = sum(torch.exp(cos(targets[a0][a1], r) / cfg.tau) for (a0, a1) in denom_items)
            total = total - torch.log(num / den)
        else:
            total = total + (1 - cos(targets[b][j], r))
        n += 1
    return total / max(n, 1)


def ref_courier_loss(e_pv, labels, pv_mask, e_click, click_mask, cfg, mha=None, projector=None):
    proj = (lambda v: list(projector(torch.stack(v)).unbind())) if cfg.proj_head else (lambda v: v)
    pv = [[proj(list(e_pv[b, j].unbind())) for j in range(e_pv.shape[1])] for b in range(e_pv.shape[0])]
    cl = [[proj(list(e_click[b, k].unbind())) for k in range(e_click.shape[1])] for b in range(e_click.shape[0])]
    lab, pm, cm = labels.tolist(), pv_mask.tolist(), click_mask.tolist()
    loss = ref_term(pv, lab, pm, cl, cm, cfg, mha)
    if cfg.use_ucs:
        # sec. 3.4 on the clicks that have an image: the latest is the target, the older ones its history;
        # a user with fewer than 2 of them has no sequence term and is no one's negative
        seqs = [[c for c, m in zip(cl[b], cm[b]) if m] for b in range(len(cl))]
        used = [s for s in seqs if len(s) >= 2]
        if used:
            loss = loss + ref_term([[s[0]] for s in used], [[1] for _ in used], [[1] for _ in used],
                                   [s[1:] for s in used], [[1] * len(s[1:]) for s in used], cfg, mha)
    return loss


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def make_batch(seed, B=4, lp=5, lc=4, d=6):
    g = torch.Generator().manual_seed(seed)
    e_pv = torch.randn(B, lp, d, generator=g, dtype=DT)
    e_click = torch.randn(B, lc, d, generator=g, dtype=DT)
    labels = (torch.rand(B, lp, generator=g) < 0.4).long()
    pv_mask = torch.rand(B, lp, generator=g) < 0.8
    click_mask = torch.rand(B, lc, generator=g) < 0.7
    # edge cases: a sample without clicks, a sample with one click, positives on padding, full PV row
    click_mask[0] = False
    labels[0, 0] = 1
    pv_mask[0, 0] = True
    click_mask[1] = torch.tensor([True] + [False] * (lc - 1))
    labels[1, :2] = 1
    pv_mask[1, :2] = torch.tensor([True, False])
    pv_mask[2] = True
    click_mask[2] = True
    labels[2, 1] = 1
    # the latest click's image missing, older clicks present: the latest usable click is the UCS target
    if B > 3:
        click_mask[3] = torch.tensor([False, True] + [True] * (lc - 2))
    return e_pv, labels, pv_mask, e_click, click_mask


CONFIGS = {
    "courier": CourierLossConfig(),
    "wo_ucs": CourierLossConfig(use_ucs=False),
    "wo_contrast": CourierLossConfig(use_contrast=False),
    "self_attention": CourierLossConfig(reconstruction="self_attention"),
    "wo_negatives": CourierLossConfig(use_negatives=False),
    "multihead": CourierLossConfig(reconstruction="multihead", num_heads=2),
    "proj_head": CourierLossConfig(proj_head=True),
    "tau_0.2_wo_neg_wo_ucs": CourierLossConfig(tau=0.2, use_negatives=False, use_ucs=False),
}


def fixed_modules(cfg, d, seed=0):
    torch.manual_seed(seed)
    loss_mod = CourierLoss(cfg, dim=d).to(DT)
    projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)).to(DT) if cfg.proj_head else None
    return loss_mod, projector


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_loop_reference(name, seed):
    cfg = CONFIGS[name]
    e_pv, labels, pv_mask, e_click, click_mask = make_batch(seed)
    d = e_pv.shape[-1]
    loss_mod, projector = fixed_modules(cfg, d)
    mha = loss_mod.reconstruction.mha

    x1 = [e_pv.clone().requires_grad_(), e_click.clone().requires_grad_()]
    got, comps = loss_mod(x1[0], labels, pv_mask, x1[1], click_mask, projector=projector)
    params = list(loss_mod.parameters()) + (list(projector.parameters()) if projector else [])
    g_got = torch.autograd.grad(got, x1 + params)

    x2 = [e_pv.clone().requires_grad_(), e_click.clone().requires_grad_()]
    want = ref_courier_loss(x2[0], labels, pv_mask, x2[1], click_mask, cfg, mha=mha, projector=projector)
    g_want = torch.autograd.grad(want, x2 + params)

    assert got.dtype == DT
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    assert comps["n_pos_pv"] > 0
    # padded slots: no gradient, and their values do not matter
    assert (g_got[0][~pv_mask] == 0).all() and (g_got[1][~click_mask] == 0).all()
    junk_pv = torch.where(pv_mask[..., None], e_pv, torch.randn_like(e_pv) * 100)
    junk_click = torch.where(click_mask[..., None], e_click, torch.randn_like(e_click) * 100)
    again, _ = loss_mod(junk_pv, labels, pv_mask, junk_click, click_mask, projector=projector)
    torch.testing.assert_close(again, got, rtol=1e-12, atol=1e-12)


def test_ucs_sequence_is_the_clicks_that_have_an_image():
    """Sec. 3.4 on usable clicks: a one-click user has no sequence term and is nobody's negative; a user
    whose latest click lost its image is a target through the latest click that has one."""
    cfg = CourierLossConfig()
    e_pv, labels, pv_mask, e_click, click_mask = make_batch(0)
    loss_mod, _ = fixed_modules(cfg, e_pv.shape[-1])
    _, comps = loss_mod(e_pv, labels, pv_mask, e_click, click_mask)
    # samples 0 (no click) and 1 (one click) take no part; 2 (all clicks) and 3 (slot 0 masked) do
    assert int(comps["n_pos_ucs"]) == int((click_mask.sum(-1) >= 2).sum())
    # the one-click user's click can be anything: the sequence loss does not see it
    moved = e_click.clone()
    moved[1, 0] = torch.randn(e_click.shape[-1], dtype=DT) * 10
    _, comps_moved = loss_mod(e_pv, labels, pv_mask, moved, click_mask)
    torch.testing.assert_close(comps_moved["l_ucs"], comps["l_ucs"], rtol=1e-12, atol=1e-12)
    # sample 3's target is its latest usable click (slot 1): moving it changes the sequence loss
    moved = e_click.clone()
    moved[3, 1] = torch.randn(e_click.shape[-1], dtype=DT) * 10
    _, comps_moved = loss_mod(e_pv, labels, pv_mask, moved, click_mask)
    assert not torch.allclose(comps_moved["l_ucs"], comps["l_ucs"])


def test_no_positive_gives_zero_with_grad():
    e_pv, labels, pv_mask, e_click, click_mask = make_batch(0)
    e_pv.requires_grad_()
    click_mask[:, 1:] = False  # no history for UCS
    loss, _ = courier_loss(e_pv, torch.zeros_like(labels), pv_mask, e_click, click_mask)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (e_pv.grad == 0).all()


# --------------------------------------------------------------------------------------------------
# Reconstruction weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["attention", "self_attention", "multihead"])
def test_reconstruction_weights_are_a_simplex(mode):
    e_pv, _, _, e_click, click_mask = make_batch(3, B=6, lp=5, lc=7, d=8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).to(DT) if mode == "multihead" else None
    r, w = reconstruct(e_pv, e_click, click_mask, mode=mode, mha=mha)
    assert r.shape == e_pv.shape and w.shape == (6, 5, 7)
    has = click_mask.any(-1)
    m = click_mask[:, None, :].expand_as(w)
    assert (w >= 0).all()
    assert (w[~m] == 0).all()  # exactly zero on padding
    torch.testing.assert_close(w.sum(-1)[has], torch.ones_like(w.sum(-1)[has]), rtol=0, atol=1e-12)
    assert (w[~has] == 0).all() and (r[~has] == 0).all()  # no clicks: nothing to reconstruct from
    if mode != "multihead":  # parameter-free modes stay in the convex hull of the clicks
        torch.testing.assert_close(r, torch.einsum("bjk,bkd->bjd", w, e_click))
        single = 1  # make_batch: sample 1 has exactly one click
        assert click_mask[single].sum() == 1
        assert torch.equal(r[single], e_click[single, 0].expand_as(r[single]))


def test_attention_is_plain_dot_product_softmax():
    e_pv, _, _, e_click, click_mask = make_batch(4)
    r, w = reconstruct(e_pv, e_click, click_mask)
    b = 2  # all clicks real
    want_w = torch.softmax(e_pv[b] @ e_click[b].T, dim=-1)
    torch.testing.assert_close(w[b], want_w)
    torch.testing.assert_close(r[b], want_w @ e_click[b])


# --------------------------------------------------------------------------------------------------
# Two processes (gloo) == one process on the concatenated batch
# --------------------------------------------------------------------------------------------------
DIST_CASES = {
    "courier": CourierLossConfig(),
    "wo_negatives": CourierLossConfig(use_negatives=False),
    "wo_contrast": CourierLossConfig(use_contrast=False),
    "multihead": CourierLossConfig(reconstruction="multihead", num_heads=2),
    "rank1_without_positives": CourierLossConfig(),
}
B_RANK = 3


def dist_inputs(name):
    e_pv, labels, pv_mask, e_click, click_mask = make_batch(7, B=2 * B_RANK, lp=4, lc=4, d=6)
    if name == "rank1_without_positives":  # rank 1: no PV positive and no click history -> no targets
        labels[B_RANK:] = 0
        click_mask[B_RANK:, 1:] = False
    return e_pv, labels, pv_mask, e_click, click_mask


def _single_or_rank(name, rank=None):
    """Loss and grads on the whole batch (rank None) or on rank's half (inside a process group)."""
    cfg = DIST_CASES[name]
    e_pv, labels, pv_mask, e_click, click_mask = dist_inputs(name)
    if rank is not None:
        sl = slice(rank * B_RANK, (rank + 1) * B_RANK)
        e_pv, labels, pv_mask, e_click, click_mask = (t[sl] for t in (e_pv, labels, pv_mask, e_click, click_mask))
    loss_mod, _ = fixed_modules(cfg, e_pv.shape[-1])
    e_pv.requires_grad_()
    e_click.requires_grad_()
    loss, _ = loss_mod(e_pv, labels, pv_mask, e_click, click_mask)
    loss.backward()
    return {"loss": loss.detach(), "e_pv": e_pv.grad, "e_click": e_click.grad,
            "params": [p.grad.clone() for p in loss_mod.parameters()]}


def _ddp_case(rank=None):
    """A tiny linear 'encoder' under DDP: (loss * world_size).backward() gives the single-process grad."""
    torch.manual_seed(0)
    enc = nn.Linear(5, 6).to(DT)
    e_pv, labels, pv_mask, e_click, click_mask = dist_inputs("courier")
    g = torch.Generator().manual_seed(11)
    x_pv, x_click = torch.randn(*e_pv.shape[:2], 5, generator=g, dtype=DT), torch.randn(*e_click.shape[:2], 5, generator=g, dtype=DT)
    tensors = (x_pv, labels, pv_mask, x_click, click_mask)
    if rank is not None:
        sl = slice(rank * B_RANK, (rank + 1) * B_RANK)
        tensors = tuple(t[sl] for t in tensors)
        enc = nn.parallel.DistributedDataParallel(enc)
    x_pv, labels, pv_mask, x_click, click_mask = tensors
    loss, _ = courier_loss(enc(x_pv), labels, pv_mask, enc(x_click), click_mask)
    (loss * world_size()).backward()
    grads = [p.grad.clone() for p in enc.parameters()]
    del enc
    return grads


def _worker(rank, world, init_file, out_dir):
    import datetime

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        res = {name: _single_or_rank(name, rank) for name in DIST_CASES}
        res["ddp"] = _ddp_case(rank)
        g = torch.Generator().manual_seed(5)
        z1, z2 = (torch.randn(2 * B_RANK, 4, generator=g, dtype=DT) for _ in range(2))
        sl = slice(rank * B_RANK, (rank + 1) * B_RANK)
        z1, z2 = z1[sl].clone().requires_grad_(), z2[sl].clone().requires_grad_()
        loss = nt_xent_loss(z1, z2, tau=0.2)
        loss.backward()
        res["simclr"] = {"loss": loss.detach(), "z1": z1.grad, "z2": z2.grad}
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@gloo_ranks_may_abort
def test_two_process_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    tol = dict(rtol=0, atol=1e-6)
    for name in DIST_CASES:
        single = _single_or_rank(name)
        # sum over ranks of each rank's share == the loss on the concatenated batch
        torch.testing.assert_close(ranks[0][name]["loss"] + ranks[1][name]["loss"], single["loss"], **tol)
        for key in ("e_pv", "e_click"):  # each rank's input grads == the slice of the single-process grads
            torch.testing.assert_close(torch.cat([ranks[r][name][key] for r in range(2)]), single[key], **tol)
        for p0, p1, p in zip(ranks[0][name]["params"], ranks[1][name]["params"], single["params"]):
            torch.testing.assert_close(p0 + p1, p, **tol)  # DDP would average: hence the x world_size
    assert ranks[1]["rank1_without_positives"]["loss"].item() == 0.0
    for g_ddp0, g_ddp1, g in zip(ranks[0]["ddp"], ranks[1]["ddp"], _ddp_case()):
        torch.testing.assert_close(g_ddp0, g, **tol)  # DDP-averaged grads of (loss * W) == single process
        torch.testing.assert_close(g_ddp1, g, **tol)
    # SimCLR through the same gather
    g = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(2 * B_RANK, 4, generator=g, dtype=DT).requires_grad_() for _ in range(2))
    loss = nt_xent_loss(z1, z2, tau=0.2)
    loss.backward()
    torch.testing.assert_close(ranks[0]["simclr"]["loss"] + ranks[1]["simclr"]["loss"], loss.detach(), **tol)
    torch.testing.assert_close(torch.cat([ranks[r]["simclr"]["z1"] for r in range(2)]), z1.grad, **tol)
    torch.testing.assert_close(torch.cat([ranks[r]["simclr"]["z2"] for r in range(2)]), z2.grad, **tol)


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
def test_nt_xent_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    views = [list(v.unbind()) for v in torch.cat([z1, z2]).unbind()]
    n, tau, total = 3, 0.2, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(torch.exp(cos(views[i], views[k]) / tau) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(cos(views[i], views[j]) / tau) / den)
    torch.testing.assert_close(nt_xent_loss(z1, z2, tau=tau), total / (2 * n), rtol=1e-10, atol=1e-12)


def test_simsiam_and_supervised_losses():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    pred = SimSiamPredictor(16)
    loss = simsiam_loss(z1, z2, pred)
    p1, p2 = pred(z1), pred(z2)
    want = -0.5 * (nn.functional.cosine_similarity(p1, z2, dim=-1).mean() + nn.functional.cosine_similarity(p2, z1, dim=-1).mean())
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert z1.grad is not None and -1.0 <= loss.item() <= 1.0
    e = torch.randn(10, 16)
    cat = torch.randint(0, 5, (10,))
    cat[3] = -1
    clf = CategoryClassifier(16, 5)
    keep = cat >= 0
    torch.testing.assert_close(supervised_loss(e, cat, clf), nn.functional.cross_entropy(clf(e[keep]), cat[keep]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_batched(dtype):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float() / 255
    v1, v2 = augment(x, size=24), augment(x, size=24)
    assert v1.shape == (4, 3, 24, 24) and v1.dtype == dtype
    assert not torch.equal(v1, v2)
    if dtype == torch.float32:
        assert 0 <= v1.min() and v1.max() <= 1


# --------------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet18"])
def test_encoder_shapes(backbone, caplog):
    with caplog.at_level("WARNING"):
        enc = ImageEncoder(backbone, dim=256)
    assert "random init" in caplog.text
    out = enc(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 256)
    assert enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 256)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_one_image_through_a_1x1_stage_trains_with_the_running_stats_there(grad_checkpointing):
    """resnet18 at 32 px ends in a 1 x 1 stage: a batch holding one real image (a rank's last) raised
    "Expected more than 1 value per channel when training". That stage's BatchNorm now normalises with its
    running statistics and keeps them; the others still train on the batch's own statistics."""
    torch.manual_seed(0)
    enc = ImageEncoder("resnet18", dim=16, grad_checkpointing=grad_checkpointing).train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    enc(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    after = enc.state_dict()
    moved = {k for k, v in after.items() if k.endswith("running_mean") and not torch.equal(v, before[k])}
    assert "backbone.bn1.running_mean" in moved and "backbone.layer3.1.bn2.running_mean" in moved  # 2 x 2
    assert not any(k.startswith("backbone.layer4.") for k in moved)  # 1 x 1: kept
    assert all(m.training for m in enc.modules())  # every BatchNorm back in train mode
    # the 1 x 1 stage normalised exactly as in eval mode: the same output as that stage frozen by hand
    enc.load_state_dict(before)
    by_hook = enc(x.detach())
    enc.load_state_dict(before)
    enc.backbone.layer4.eval()
    torch.testing.assert_close(by_hook, enc(x.detach()), rtol=0, atol=0)
    enc.train()
    enc(torch.randn(2, 3, 32, 32))  # two images: batch statistics everywhere, as before
    assert not torch.equal(enc.state_dict()["backbone.layer4.1.bn2.running_mean"],
                           before["backbone.layer4.1.bn2.running_mean"])


@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet18"])  # swin_t: same code path, too slow on CPU
def test_grad_checkpointing_is_exact(backbone):
    torch.manual_seed(0)
    dt, n = (DT, 4) if backbone == "tiny_cnn" else (torch.float32, 2)  # float64 convs are slow on CPU
    plain = ImageEncoder(backbone, dim=16).to(dt).train()
    ckpt = ImageEncoder(backbone, dim=16, grad_checkpointing=True).to(dt).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(n, 3, 32, 32, dtype=dt)
    outs, grads = [], []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # same random draws (swin's stochastic depth) in both runs
        out = m(xi)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    tol = dict(rtol=1e-10, atol=1e-12) if dt == DT else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, **tol)
    # BatchNorm running stats are updated once, not again by the recomputation
    for (ka, a), (kb, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(a, b, **tol)


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    src = ImageEncoder("tiny_cnn", dim=32).train()
    src(torch.randn(8, 3, 32, 32))  # move BN running stats away from their init
    path = tmp_path / "encoder.pt"
    torch.save(src.state_dict(), path)
    dst = ImageEncoder("tiny_cnn", dim=32, pretrained_path=str(path))
    assert dst.load_report == {"missing": [], "unexpected": []}
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_backbone_only_state_dict_reports_classifier_keys(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet_like.pt"
    torch.save({"module." + k: v for k, v in tv.state_dict().items()}, path)  # as saved from DDP
    enc = ImageEncoder("resnet18", pretrained_path=str(path))
    assert enc.load_report == {"missing": [], "unexpected": ["fc.weight", "fc.bias"]}
    torch.testing.assert_close(enc.backbone.conv1.weight, tv.conv1.weight, rtol=0, atol=0)


def test_pretrained_weights_from_a_checkpoint_or_another_backbone(tmp_path):
    """A COURIER checkpoint (last.pt: {"model": the whole model's state}) gives its encoder's weights; a
    state dict of another backbone is refused instead of leaving the backbone at random init."""
    import torchvision

    from training.courier import ImageEncoder

    torch.manual_seed(0)
    src = ImageEncoder("tiny_cnn", dim=32)
    path = tmp_path / "last.pt"
    torch.save({"model": {"encoder." + k: v for k, v in src.state_dict().items()}, "optimizer": {}}, path)
    dst = ImageEncoder("tiny_cnn", dim=32, pretrained_path=str(path))
    assert dst.load_report == {"missing": [], "unexpected": []}
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)
    other = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="backbone's weights are not in it"):
        ImageEncoder("tiny_cnn", dim=32, pretrained_path=str(other))


def test_courier_model_end_to_end():
    torch.manual_seed(0)
    cfg = CourierLossConfig(proj_head=True)
    model = CourierModel(ImageEncoder("tiny_cnn", dim=16, proj_head=True), cfg).to(DT).eval()
    _, labels, pv_mask, _, click_mask = make_batch(2, B=3, lp=4, lc=3, d=16)
    pv_img = torch.randn(3, 4, 3, 32, 32, dtype=DT)
    click_img = torch.randn(3, 3, 3, 32, 32, dtype=DT)
    loss, comps = model(pv_img, labels, pv_mask, click_img, click_mask)
    e_pv = model.encoder(pv_img.flatten(0, 1)).view(3, 4, -1) * pv_mask[..., None]
    e_click = model.encoder(click_img.flatten(0, 1)).view(3, 3, -1) * click_mask[..., None]
    want, _ = courier_loss(e_pv, labels, pv_mask, e_click, click_mask, cfg, projector=model.encoder.project)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.encoder.proj[0].weight.grad is not None
    assert set(comps) == {"loss", "l_pv", "l_ucs", "n_pos_pv", "n_pos_ucs"}


def test_config_replace_is_a_dataclass():
    assert replace(CourierLossConfig(), tau=0.1).tau == 0.1
