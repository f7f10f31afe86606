"""An MoE expert layer written against NeMo AutoModel's ``fused_a2a`` module, the way AutoModel's
``GroupedExpertsDeepEP`` + ``MoEFlexTokenDispatcher`` use it (DeepEP flow: top-k -> FusedDispatch
-> per-expert permute by tokens_per_expert -> grouped matmul weighted by the probs -> unpermute ->
FusedCombine; HybridEP flow: multihot routing map -> hybrid_ep_dispatch -> per-expert matmul over
the padded expert-major rows -> hybrid_ep_combine).

Nothing here knows about fused_a2a: tests/test_dropin.py makes the import below resolve to
``torch_fused_a2a`` (the only change a user makes) and runs this file unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nemo_automodel.components.moe.megatron.fused_a2a import (
    fused_combine,
    fused_dispatch,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
    init_hybrid_ep_buffer,
    set_deepep_num_sms,
)


def indices_to_multihot(indices, probs, num_columns):
    """[T, K] top-k indices (-1: none) and probs -> [T, num_columns] bool map and f32 probs."""
    routing_map = torch.zeros(
        indices.shape[0], num_columns, dtype=torch.bool, device=indices.device
    )
    dense_probs = torch.zeros(
        indices.shape[0], num_columns, dtype=torch.float32, device=indices.device
    )
    valid = indices >= 0
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    routing_map[rows[valid], indices[valid]] = True
    dense_probs = dense_probs.index_put((rows[valid], indices[valid]), probs[valid])
    return routing_map, dense_probs


def permute(tokens, routing_map, probs):
    """Rows grouped by expert (expert-major, tokens ascending), their probs, and the map back."""
    sorted_indices = routing_map.T.nonzero(as_tuple=True)[1]
    return tokens.index_select(0, sorted_indices), probs.T[routing_map.T], sorted_indices


def unpermute(permuted, sorted_indices, num_rows):
    out = torch.zeros(num_rows, permuted.shape[1], dtype=permuted.dtype, device=permuted.device)
    return out.index_add(0, sorted_indices, permuted)


def grouped_mm(rows, weights, tokens_per_expert):
    """rows [sum(tpe), in] times weights [L, in, out], one expert's segment at a time."""
    segments = torch.split(rows, [int(c) for c in tokens_per_expert.tolist()])
    return torch.cat([seg @ weights[j] for j, seg in enumerate(segments)])


class DeepEPDispatcher:
    """The DeepEP manager's calls: setup_metadata -> dispatch -> permute -> unpermute ->
    combine."""

    def __init__(self, group, num_experts, num_local_experts, router_topk, num_sms=20):
        self.group, self.num_experts = group, num_experts
        self.num_local_experts, self.router_topk = num_local_experts, router_topk
        set_deepep_num_sms(num_sms)
        self.handle = None

    def setup_metadata(self, token_indices, token_probs):
        self.token_indices, self.token_probs = token_indices, token_probs.float()

    def dispatch(self, hidden_states, async_finish=False, allocate_on_comm_stream=False):
        hidden, indices, probs, tokens_per_expert, handle = fused_dispatch(
            hidden_states,
            self.token_indices,
            self.token_probs,
            self.num_experts,
            self.group,
            async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream,
        )
        self.handle, self.tokens_per_expert = handle, tokens_per_expert
        self.dispatched_indices, self.dispatched_probs = indices, probs
        return hidden

    def get_permuted_hidden_states_by_experts(self, hidden_states):
        self.routing_map, probs = indices_to_multihot(
            self.dispatched_indices, self.dispatched_probs, self.num_local_experts
        )
        self.hidden_rows = hidden_states.shape[0]
        permuted, permuted_probs, self.reversed_mapping = permute(
            hidden_states, self.routing_map, probs
        )
        return permuted, permuted_probs

    def get_restored_hidden_states_by_experts(self, hidden_states):
        return unpermute(hidden_states, self.reversed_mapping, self.hidden_rows)

    def combine(self, hidden_states, async_finish=False, allocate_on_comm_stream=False):
        out, _ = fused_combine(
            hidden_states,
            self.group,
            self.handle,
            async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream,
        )
        self.handle = None
        return out


class HybridEPDispatcher:
    """The HybridEP manager's calls: multihot metadata -> hybrid_ep_dispatch (rows arrive
    permuted and padded) -> hybrid_ep_combine with the dispatch's num_permuted_tokens."""

    def __init__(self, group, num_experts, num_local_experts, pad_multiple=None, num_sms=24):
        self.group, self.num_experts, self.num_local_experts = group, num_experts, num_local_experts
        self.pad_multiple, self.num_sms = pad_multiple, num_sms
        self.num_permuted_tokens = None
        self.handle = None

    def setup_metadata_from_indices(self, token_indices, token_probs):
        self.routing_map, self.token_probs = indices_to_multihot(
            token_indices, token_probs, self.num_experts
        )

    def dispatch(self, hidden_states):
        self.num_permuted_tokens = None
        hidden, self.dispatched_probs, _, tokens_per_expert, self.handle = hybrid_ep_dispatch(
            x=hidden_states,
            routing_map=self.routing_map,
            probs=self.token_probs,
            group=self.group,
            num_local_experts=self.num_local_experts,
            num_sms_dispatch_api=self.num_sms,
            num_sms_combine_api=self.num_sms,
            num_permuted_tokens=self.num_permuted_tokens,
            pad_multiple=self.pad_multiple,
        )
        self.tokens_per_expert = tokens_per_expert
        self.num_permuted_tokens = tokens_per_expert.sum()
        return hidden

    def combine(self, hidden_states):
        out = hybrid_ep_combine(
            x=hidden_states,
            handle=self.handle,
            num_permuted_tokens=self.num_permuted_tokens,
            pad_multiple=self.pad_multiple,
        )
        self.handle, self.num_permuted_tokens = None, None
        return out


class GroupedExperts(torch.nn.Module):
    """This rank's experts ([L, dim, inter] and [L, inter, dim]); forward(x, token_mask, weights,
    indices) as GroupedExpertsDeepEP: expert e's output is (silu(x @ W1[e]) * prob) @ W2[e]."""

    def __init__(self, w1_local, w2_local, dispatcher):
        super().__init__()
        self.w1 = torch.nn.Parameter(w1_local)
        self.w2 = torch.nn.Parameter(w2_local)
        self.dispatcher = dispatcher

    def forward(self, x, token_mask, weights, indices):
        indices = indices.masked_fill(~token_mask.unsqueeze(-1), -1)
        d = self.dispatcher
        if isinstance(d, HybridEPDispatcher):
            d.setup_metadata_from_indices(indices, weights)
            rows = d.dispatch(x)
            probs = d.dispatched_probs
            tokens_per_expert = d.tokens_per_expert
        else:
            d.setup_metadata(indices, weights)
            rows, probs = d.get_permuted_hidden_states_by_experts(d.dispatch(x))
            tokens_per_expert = d.tokens_per_expert
        hidden = grouped_mm(rows, self.w1, tokens_per_expert)
        hidden = F.silu(hidden) * probs.unsqueeze(-1).to(hidden.dtype)
        out = grouped_mm(hidden, self.w2, tokens_per_expert)
        if isinstance(d, HybridEPDispatcher):
            return d.combine(out)
        return d.combine(d.get_restored_hidden_states_by_experts(out))


def hybrid_init(group, hidden_dim, seq_len, num_local_experts):
    """What a trainer may call up front (optional: dispatch initialises lazily)."""
    init_hybrid_ep_buffer(group, hidden_dim, seq_len, num_local_experts, 24, 24, False)
