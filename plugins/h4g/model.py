"""H4G's model (core): a frozen sentence encoder, a GNN with ego–neighbour separation, both sides mapped into
the Poincaré ball (the text side is the encoder's own space unless ``text_head``), and the H4G operator M = diag(M_1 … M_G) applied by Möbius matvec (methods/h4g.md §3).

Arms (``geometry``): ``h4g`` (ball + M), ``hyperbolic`` (ball, M = I: the operator is skipped), ``euclidean``
(cosine on unit vectors). Similarity in the ball (``similarity``): ``distance`` (−d_c(g, t)/τ) or ``tangent``
(cosine after logmap0, /τ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.kernels.poincare import block_mobius_matvec, expmap0, logmap0, pairwise_dist, radius


class EgoNeighbourGNN(nn.Module):
    """GraphSAGE/GCN layers that keep the ego and the neighbour aggregate apart (H2GCN's separation): each
    layer gives cat(W_ego·h, AGG(h over neighbours, no self-loops)); the output combines the input projection
    and every layer's output (cat, then a linear map), so heterophilic neighbourhoods do not wash out the ego.
    With ``skip`` the output is the node's own input features plus that map, initialised to zero: the encoder starts
    as the identity on the ego's text features and learns a correction, instead of squeezing them through ``hidden``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, conv: str = "sage",
                 dropout: float = 0.0, skip: bool = False):
        from torch_geometric.nn import GCNConv, SAGEConv

        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.ego = nn.ModuleList(nn.Linear(hidden * (1 if i == 0 else 2), hidden) for i in range(layers))
        self.nbr = nn.ModuleList(
            SAGEConv(hidden * (1 if i == 0 else 2), hidden, aggr="mean", root_weight=False) if conv == "sage"
            else GCNConv(hidden * (1 if i == 0 else 2), hidden, add_self_loops=False) for i in range(layers))
        self.out = nn.Linear(hidden * (1 + 2 * layers), out_dim)
        self.dropout, self.skip = dropout, skip
        if skip:
            if in_dim != out_dim:
                raise ValueError(f"an ego skip needs the output dim {out_dim} to equal the input dim {in_dim}")
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        parts = [h]
        for ego, nbr in zip(self.ego, self.nbr):
            h = F.dropout(h, self.dropout, self.training)
            h = F.relu(torch.cat([ego(h), nbr(h, edge_index)], dim=-1))
            parts.append(h)
        out = self.out(torch.cat(parts, dim=-1))
        return x + out if self.skip else out


class MobiusBlockScaling(nn.Module):
    """The H4G operator x ↦ M ⊗_c x, M = diag(M_1 … M_G) of G square blocks (``form='full'``, d²/G
    parameters) or G scalars M_g = s_g·I (``form='scalar'``), initialised to ``init``·I (contractive for init < 1)."""

    def __init__(self, dim: int, groups: int, c: float, init: float = 0.5, form: str = "full"):
        super().__init__()
        if dim % groups:
            raise ValueError(f"embedding dim {dim} is not divisible by {groups} blocks")
        k = dim // groups
        self.c, self.form, self.k = c, form, k
        if form == "full":
            self.weight = nn.Parameter(init * torch.eye(k).repeat(groups, 1, 1))
        else:
            self.weight = nn.Parameter(torch.full((groups,), float(init)))

    def blocks(self) -> torch.Tensor:
        if self.form == "full":
            return self.weight
        return self.weight.view(-1, 1, 1) * torch.eye(self.k, device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_mobius_matvec(self.blocks(), x, self.c)


class H4GModel(nn.Module):
    """Text encoder (frozen, mean pooling, L2-normalised, as sentence-transformers) + GNN + heads + geometry."""

    def __init__(self, text_encoder: nn.Module, tokenizer, dim: int | None = None, hidden: int = 64, layers: int = 2,
                 conv: str = "sage", dropout: float = 0.0, geometry: str = "h4g", similarity: str = "distance",
                 c: float = 1.0, groups: int = 4, block_form: str = "full", init_scale: float = 0.5,
                 scale_texts: bool = False, text_head: bool = False, temperature: float = 0.1,
                 learn_temperature: bool = True, max_length: int = 128, ego_skip: bool = True):
        super().__init__()
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, max_length
        self.text_encoder.requires_grad_(False)
        first = next(text_encoder.parameters())  # what a text-feature cache is keyed by
        self.text_encoder_id = (f"{text_encoder.config._name_or_path}|{float(first.double().sum()):.10e}|"
                                f"max_length={max_length}")
        text_dim = text_encoder.config.hidden_size
        dim = dim or text_dim
        if not text_head and dim != text_dim:
            raise ValueError(f"without a text head the embedding dim is the text encoder's width {text_dim}, not {dim}")
        self.graph_encoder = EgoNeighbourGNN(text_dim, hidden, dim, layers, conv, dropout, ego_skip and not text_head)
        self.text_head = (nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) if text_head
                          else nn.Identity())  # Identity: the pretrained text space itself, which the graph side aligns to
        self.geometry, self.similarity, self.c, self.scale_texts = geometry, similarity, c, scale_texts
        self.scaling = MobiusBlockScaling(dim, groups, c, init_scale, block_form) if geometry == "h4g" else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    # -- text --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        hidden = self.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        self.text_encoder.train(was_training)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    # -- embeddings --------------------------------------------------------------------------------
    def _to_space(self, u: torch.Tensor, scale: bool) -> torch.Tensor:
        if self.geometry == "euclidean":
            return F.normalize(u, dim=-1)
        z = expmap0(u, self.c).to(u.dtype)
        return self.scaling(z) if scale and self.scaling is not None else z

    def embed_nodes(self, data) -> torch.Tensor:
        return self._to_space(self.graph_encoder(data.x, data.edge_index), scale=True)

    def embed_texts(self, features: torch.Tensor) -> torch.Tensor:
        return self._to_space(self.text_head(features), scale=self.scale_texts)

    def forward(self, data) -> torch.Tensor:
        return self.embed_nodes(data)

    def logits(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(n_g, n_t) similarity / τ: cosine (euclidean), −d_c (distance) or cosine of logmap0 (tangent)."""
        scale = self.log_scale.clamp(max=math.log(100.0)).exp()
        if self.geometry == "euclidean":
            return scale * g @ t.t()
        if self.similarity == "tangent":
            return scale * F.normalize(logmap0(g, self.c), dim=-1) @ F.normalize(logmap0(t, self.c), dim=-1).t()
        return -scale * pairwise_dist(g, t, self.c).to(g.dtype)

    def radius(self, z: torch.Tensor) -> torch.Tensor:
        """r(z) = d_c(0, z) in the ball; ‖z‖ (= 1) in the Euclidean arm."""
        return z.norm(dim=-1) if self.geometry == "euclidean" else radius(z, self.c)
