"""The downstream CTR model (the paper's appendix A, Fig. A1, reduced to what ctr_train carries).

item representation  = [item-ID embedding | image feature]          (image feature by `feature_mode`)
user interest        = target attention over the click history's item representations
MLP input            = [target, interest, target * interest, user-ID, query, position, history length,
                        SimScore features (simscore mode)]
MLP                  = `layers` hidden ReLU layers + 1 output logit (4 hidden + output = the paper's 5)

Image feature modes (the paper's Table B1):
- ``none``        no image feature (the Baseline row).
- ``vector``      the item's image embedding, linearly projected (for the target and each history item).
- ``simscore``    cos(target image, history image k) for each k: an extra input of the attention unit
                  and, with their max and mean, of the MLP. The item representation has no image part.
- ``cluster_id``  an embedding of the item's image cluster id, shared by target and history items, so
                  "the target is in a cluster the user clicked" is one learned dot product away.
- ``multi_cluster`` the cluster-id embedding plus one embedding per coarser level (features.levels),
                  concatenated (ctr.level_combine, or summed): items of related fine clusters share
                  their coarse rows, so a fine id seen rarely still carries what its coarse cluster
                  learned, and with one slice per level the attention sees "same coarse cluster" as its
                  own product, not drowned by the fine rows.

The attention unit is DIN-style (an MLP over [t, h, t*h, t-h]) rather than the production model's
multi-head self-attention: with one short history (5 clicks) the target-aware form is the one that can
use the target/history match that cluster ids and SimScores carry.

Everything needed to rebuild the module is in `ModelSpec` (JSON); the weights are a plain state_dict,
so a registered model loads with torch.load(weights_only=True) and nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from etl.config import FEATURE_MODES as MODES
from etl.config import LEVEL_COMBINES
from training.ctr.data import NO_IMAGE_ROW, POSITION_BUCKETS, QUERY_BUCKETS

# Cluster-ID rows start at unit scale (torch's default): at 0.05 the target/history products the
# attention unit must learn from are ~1e-3 and a small run barely moves (measured: AUC 0.53 vs 0.71 on a
# synthetic table whose label is a cluster match). ID rows stay small: most ids are seen only a few times.
CLUSTER_INIT_STD = 1.0


@dataclass(frozen=True)
class ModelSpec:
    feature_mode: str
    num_cluster_rows: int = 2  # cluster embedding rows: max cluster id + 3 (0 = padding, 1 = no image)
    level_rows: list = field(default_factory=list)  # multi_cluster: rows per coarser level (max id + 3)
    # multi_cluster: how the fine and the coarser levels' embeddings form the image part: "concat" (each
    # level its own slice, so the attention sees a match per level) or "sum" (one shared slice). A spec
    # written before this key existed is a "sum" model.
    level_combine: str = "sum"
    vector_in: int = 1  # image-vector length (vector mode)
    id_dim: int = 16
    cluster_dim: int = 16
    vector_dim: int = 16
    context_dim: int = 8
    layers: list = field(default_factory=lambda: [256, 128, 64, 32])
    attention_hidden: int = 32
    max_history: int = 5
    item_buckets: int = 262144
    user_buckets: int = 65536
    id_dropout: float = 0.1
    query_buckets: int = QUERY_BUCKETS
    position_buckets: int = POSITION_BUCKETS

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model spec has unknown keys {sorted(unknown)}: written by a newer version?")
        return cls(**data)


class HashedEmbedding(nn.Module):
    """An embedding over hashed id buckets with a shared out-of-vocabulary row 0.

    `seen` (a buffer, saved with the weights) marks the buckets that held training ids; any other
    bucket is sent to row 0 at lookup, so ids never seen in training share one path instead of reading
    an untrained random row. During training a share `dropout` of ids is also sent to row 0, which is
    what trains that shared row (otherwise cold items would get its random initialisation); without
    dropout (the query table) row 0 starts at zero and stays there.
    """

    def __init__(self, buckets: int, dim: int, dropout: float = 0.0, sparse: bool = False):
        super().__init__()
        # sparse=True for the big id tables: the optimizer then touches only the rows of the batch
        # (dense Adam over 262k x 16 rows per step dominated a step on 2 cores).
        self.emb = nn.Embedding(buckets, dim, sparse=sparse)
        nn.init.normal_(self.emb.weight, std=0.05)
        if dropout == 0:  # nothing trains row 0: an unseen id then reads zero (no signal), not a random row
            with torch.no_grad():
                self.emb.weight[0].zero_()
        self.dropout = dropout
        self.register_buffer("seen", torch.zeros(buckets, dtype=torch.bool))

    @torch.no_grad()
    def mark_seen(self, idx: torch.Tensor) -> None:
        self.seen[idx.reshape(-1)] = True
        self.seen[0] = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.where(self.seen[idx], idx, torch.zeros_like(idx))
        if self.training and self.dropout > 0:
            idx = torch.where(torch.rand(idx.shape, device=idx.device) < self.dropout, torch.zeros_like(idx), idx)
        return self.emb(idx)


class ClusterEmbedding(nn.Embedding):
    """A cluster-id embedding (row 0 = padding, row NO_IMAGE_ROW = an item without an image) in which a
    cluster the training rows never held reads the no-image row: the model learned nothing of that
    cluster's images, as of an item without one, so it takes that trained path instead of an untrained
    random row. That also covers an id past the table (a cluster the training and evaluation data did not
    hold, e.g. first filled by a later refresh), which a champion re-scored on newer dates meets.

    The no-image row starts at zero: where no training item lacks an image it is never trained, and an
    unseen cluster then reads no signal rather than a random vector of the clusters' scale.

    `seen` is a buffer, saved with the weights; a model saved before it existed read every row as trained.
    """

    def __init__(self, rows: int, dim: int, init_std: float):
        super().__init__(rows, dim, padding_idx=0)
        nn.init.normal_(self.weight, std=init_std)
        with torch.no_grad():
            self.weight[NO_IMAGE_ROW].zero_()
        self.register_buffer("seen", torch.zeros(rows, dtype=torch.bool))
        self.seen[:NO_IMAGE_ROW + 1] = True  # padding and no image: always their own rows

    @torch.no_grad()
    def mark_seen(self, rows: torch.Tensor) -> None:
        self.seen[rows.reshape(-1)] = True

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        in_table = rows < self.num_embeddings
        known = in_table & self.seen[torch.where(in_table, rows, torch.zeros_like(rows))]
        return super().forward(torch.where(known, rows, torch.full_like(rows, NO_IMAGE_ROW)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "seen", torch.ones(self.num_embeddings, dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CTRModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.feature_mode not in MODES:
            raise ValueError(f"feature_mode must be one of {MODES}, got {spec.feature_mode!r}")
        self.spec = spec
        s = spec
        self.item_id = HashedEmbedding(s.item_buckets, s.id_dim, s.id_dropout, sparse=True)
        self.user_id = HashedEmbedding(s.user_buckets, s.id_dim, s.id_dropout, sparse=True)
        self.query = HashedEmbedding(s.query_buckets, s.context_dim)
        self.position = nn.Embedding(s.position_buckets, s.context_dim)
        item_dim = s.id_dim
        if s.feature_mode in ("cluster_id", "multi_cluster"):
            self.cluster = ClusterEmbedding(s.num_cluster_rows, s.cluster_dim, CLUSTER_INIT_STD)
            item_dim += s.cluster_dim
        if s.feature_mode == "multi_cluster":
            if not s.level_rows:
                raise ValueError("feature_mode multi_cluster needs cluster levels: build_clusters with "
                                 "features.levels, then attach, so ctr_train carries item_cluster_levels")
            if s.level_combine not in LEVEL_COMBINES:
                raise ValueError(f"level_combine must be one of {LEVEL_COMBINES}, got {s.level_combine!r}")
            concat = s.level_combine == "concat"
            std = CLUSTER_INIT_STD if concat else CLUSTER_INIT_STD / len(s.level_rows)
            self.levels = nn.ModuleList(ClusterEmbedding(rows, s.cluster_dim, std) for rows in s.level_rows)
            if concat:
                item_dim += s.cluster_dim * len(s.level_rows)
        elif s.feature_mode == "vector":
            self.vector = nn.Linear(s.vector_in, s.vector_dim)
            item_dim += s.vector_dim
        sim_in = 1 if s.feature_mode == "simscore" else 0
        self.attention = nn.Sequential(nn.Linear(4 * item_dim + sim_in, s.attention_hidden), nn.ReLU(),
                                       nn.Linear(s.attention_hidden, 1))
        mlp_in = 3 * item_dim + s.id_dim + 2 * s.context_dim + 1
        if s.feature_mode == "simscore":
            mlp_in += s.max_history + 2
        widths = [mlp_in, *s.layers]
        mlp: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mlp += [nn.Linear(a, b), nn.ReLU()]
        mlp.append(nn.Linear(widths[-1], 1))
        self.mlp = nn.Sequential(*mlp)

    def item_repr(self, ids: torch.Tensor, clusters: torch.Tensor, vectors: torch.Tensor,
                  levels: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.item_id(ids)]
        if self.spec.feature_mode in ("cluster_id", "multi_cluster"):
            image = self.cluster(clusters)
            if self.spec.feature_mode == "multi_cluster":
                if levels is None or levels.shape[-1] != len(self.levels):
                    raise ValueError(f"this model reads {len(self.levels)} cluster level(s); the data has "
                                     f"{0 if levels is None else levels.shape[-1]}")
                coarse = [emb(levels[..., k]) for k, emb in enumerate(self.levels)]
                if self.spec.level_combine == "concat":  # [fine | level 1 | .. | level K]
                    image = torch.cat([image, *coarse], dim=-1)
                else:  # fine row + one row per coarser level, summed
                    for c in coarse:
                        image = image + c
            parts.append(image)
        elif self.spec.feature_mode == "vector":
            parts.append(self.vector(vectors))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def mark_seen(self, batch: dict) -> None:
        """Record the training data's id buckets (call once with all training rows before fitting)."""
        self.item_id.mark_seen(batch["item"])
        self.item_id.mark_seen(batch["hist_item"][batch["hist_mask"]])
        self.user_id.mark_seen(batch["user"])
        self.query.mark_seen(batch["query"])
        if self.spec.feature_mode in ("cluster_id", "multi_cluster"):
            self.cluster.mark_seen(batch["item_cluster"])
            self.cluster.mark_seen(batch["hist_cluster"][batch["hist_mask"]])
        if self.spec.feature_mode == "multi_cluster":
            for k, emb in enumerate(self.levels):
                emb.mark_seen(batch["item_levels"][:, k])
                emb.mark_seen(batch["hist_levels"][..., k][batch["hist_mask"]])

    def forward(self, b: dict) -> torch.Tensor:
        """Logits (B,) for a batch dict from `CtrTensors.take`."""
        mode = self.spec.feature_mode
        t = self.item_repr(b["item"], b["item_cluster"], b["item_vec"], b.get("item_levels"))  # (B, D)
        h = self.item_repr(b["hist_item"], b["hist_cluster"], b["hist_vec"], b.get("hist_levels"))  # (B, L, D)
        mask = b["hist_mask"]
        te = t.unsqueeze(1).expand_as(h)
        att_in = [te, h, te * h, te - h]
        if mode == "simscore":
            att_in.append(b["sim"].unsqueeze(-1))
        scores = self.attention(torch.cat(att_in, dim=-1)).squeeze(-1)  # (B, L)
        # Masked softmax; a row with no history gets all-zero weights (interest = 0), not NaN.
        w = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1) * mask
        interest = (w.unsqueeze(-1) * h).sum(1)
        n_hist = mask.sum(1, keepdim=True).float()
        feats = [t, interest, t * interest, self.user_id(b["user"]), self.query(b["query"]),
                 self.position(b["position"]), n_hist / self.spec.max_history]
        if mode == "simscore":
            sim = b["sim"] * mask
            sim_max = sim.masked_fill(~mask, -1.0).max(1, keepdim=True).values * (n_hist > 0)
            feats += [sim, sim_max, sim.sum(1, keepdim=True) / n_hist.clamp(min=1)]
        return self.mlp(torch.cat(feats, dim=-1)).squeeze(-1)
