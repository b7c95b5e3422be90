"""OFA's decoder with per-row early exit.

Teacher-forced (parallel) calls run all positions at once. Without exits every position runs every
layer (training); with exits a position that exits keeps its hidden state, so later layers see
keys/values computed from it (the `copy` semantics), and later layers run only the positions still
active (their queries are gathered), so the trace records what ran. Cached (incremental) calls decode
one token per row: rows that exited are dropped from the later layers' batches, and the keys/values
those layers need for the skipped position are handled by the KV policy: `copy` computes them from the
exited state now, `recompute` computes the same values later and only if a later token reaches that
layer, `drop` leaves a masked hole (the reference's choice, kept for comparison; positions stay aligned).
"""
from typing import Any, Dict, List, Optional

import torch
from fairseq.models import FairseqIncrementalDecoder
from torch import nn

from mue.exiting.config import NEVER_EXIT

from .layers import DecoderLayer
from .positions import OFA_BUCKET_POSITIONS, attention_bias, token_bucket_table


class MueDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        dim, heads = cfg.decoder_embed_dim, cfg.decoder_attention_heads
        self.heads, self.padding_idx = heads, dictionary.pad()
        self.pos_scaling = (dim / heads * cfg.attn_scale_factor) ** -0.5
        self.max_target_positions = cfg.max_target_positions
        self.exit_settings = None  # set only inside MueOFAModel.exiting (mue.exiting.session.exit_session)

        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.embed_positions = nn.Embedding(cfg.max_target_positions + 2, dim)
        self.pos_ln = nn.LayerNorm(dim)
        self.self_pos_q_linear = nn.Linear(dim, dim)
        self.self_pos_k_linear = nn.Linear(dim, dim)
        self.cross_pos_q_linear = nn.Linear(dim, dim)
        self.cross_pos_k_linear = nn.Linear(dim, dim)
        # image-code generation parts of OFA: kept so official checkpoints load, unused by MuE's tasks
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, dim)
        self.image_pos_ln = nn.LayerNorm(dim)
        self.code_layernorm_embedding = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.decoder_drop_path_rate, cfg.decoder_layers).tolist()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, cfg.decoder_ffn_embed_dim, heads, cfg.dropout, cfg.attention_dropout,
                         cfg.activation_dropout, rate, cfg.attn_scale_factor)
            for rate in rates
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
        self.output_projection.weight = embed_tokens.weight
        n_token_buckets = 2 * cfg.token_bucket_size - 1
        n_image_buckets = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_token_buckets, heads) for _ in self.layers)
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_image_buckets, heads) for _ in self.layers)
        self.register_buffer("token_rp_bucket", token_bucket_table(cfg.token_bucket_size, OFA_BUCKET_POSITIONS), persistent=False)

    # ---- pieces --------------------------------------------------------------------------------
    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Hidden states of any layer -> vocabulary logits (shared final LayerNorm, tied projection)."""
        return self.output_projection(self.layer_norm(states))

    def output_layer(self, features):
        return self.output_projection(features)

    def _target_positions(self, length):
        if length > self.max_target_positions:
            raise ValueError(f"mue_ofa: {length} target tokens exceed --max-target-positions {self.max_target_positions}")
        return self.pos_ln(self.embed_positions.weight[:length])

    def _self_bias(self, idx, length, abs_bias, last_only):
        buckets = self.token_rp_bucket[:length, :length]
        if last_only:
            buckets = buckets[-1:]
        return abs_bias + self.token_rel_pos_table_list[idx](buckets).permute(2, 0, 1)

    def _cross_bias(self, tgt_positions, encoder_out):
        src_positions = encoder_out["position_embeddings"][0][0]  # identical for every row
        return attention_bias(self.cross_pos_q_linear(tgt_positions), self.cross_pos_k_linear(src_positions),
                              self.heads, self.pos_scaling)[None]

    def _embed(self, tokens):
        return self.dropout(self.layernorm_embedding(self.embed_tokens(tokens)))

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                return_all_hiddens=False, forced_depths=None, **unused):
        if encoder_out is None:
            raise ValueError("mue_ofa's decoder needs encoder_out")
        if incremental_state is not None:
            x, extra = self._step(prev_output_tokens, encoder_out, incremental_state)
        else:
            x, extra = self._parallel(prev_output_tokens, encoder_out, forced_depths)
        x = self.layer_norm(x)
        return (x if features_only else self.output_projection(x)), extra

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        return self.forward(prev_output_tokens, encoder_out, incremental_state, features_only=True, **kwargs)

    def _parallel(self, tokens, encoder_out, forced_depths=None):
        """All positions at once (training, scoring). With exits (settings attached, or `forced_depths`
        [B, T]), a position that exits keeps its state, and later layers run only the positions still
        active: their queries are gathered, so what the trace records is what ran."""
        bsz, length = tokens.shape
        settings = self.exit_settings
        positions = self._target_positions(length)
        abs_bias = attention_bias(self.self_pos_q_linear(positions), self.self_pos_k_linear(positions),
                                  self.heads, self.pos_scaling)
        cross_bias = self._cross_bias(positions, encoder_out)
        enc = encoder_out["encoder_out"][0].transpose(0, 1)
        cross_blocked = encoder_out["encoder_padding_mask"][0][:, None, None, :]
        blocked = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
        padding = tokens.eq(self.padding_idx)
        if padding.any():
            blocked = blocked | padding[:, None, None, :]

        x = self._embed(tokens)
        inner_states: List[torch.Tensor] = [x.transpose(0, 1)]
        rule = settings.dec_rule if settings is not None else None
        thresholds = None
        if settings is not None and forced_depths is None:
            thresholds = torch.tensor([settings.dec_threshold(t) for t in range(length)], device=x.device)
            thresholds = thresholds if rule.enabled(thresholds) else None
        if forced_depths is None and thresholds is None:  # every position runs every layer
            for idx, layer in enumerate(self.layers):
                k, v = layer.self_kv(x)
                ck, cv = layer.cross_kv(enc)
                x = layer(x, k, v, self._self_bias(idx, length, abs_bias, False)[None], blocked,
                          ck, cv, cross_bias, cross_blocked)
                inner_states.append(x.transpose(0, 1))
            depths = torch.full((bsz, length), len(self.layers), dtype=torch.long, device=x.device)
            self._record_parallel(settings, encoder_out, torch.ones_like(padding), depths)  # padding ran too
            return x, {"attn": [None], "inner_states": inner_states, "exit_depths": depths}

        thresholds = None if thresholds is None else thresholds.expand(bsz, length).flatten()
        drop = settings is not None and settings.kv_policy == "drop"
        state = rule.new_state(bsz * length, x.device) if thresholds is not None else None
        active = ~padding  # padding positions are never read: they need no layer
        depths = torch.zeros(bsz, length, dtype=torch.long, device=x.device)
        decided = torch.zeros(length, dtype=torch.long, device=x.device)  # exit decisions per position
        kv_filled = torch.zeros(length, dtype=torch.long, device=x.device)  # k/v of exited positions computed
        cross_layers = torch.zeros(bsz, dtype=torch.long, device=x.device)  # layers whose cross k/v each row made
        for idx, layer in enumerate(self.layers):
            rows_q, pos_q = active.nonzero(as_tuple=True)  # the queries this layer runs, row-major
            if rows_q.numel() == 0:
                inner_states.append(x.transpose(0, 1))
                continue
            rows = active.any(1).nonzero().flatten()  # rows with a query: their keys/values are needed
            slot = torch.zeros(bsz, dtype=torch.long, device=x.device).index_copy_(
                0, rows, torch.arange(rows.numel(), device=x.device))[rows_q]
            k, v = layer.self_kv(x[rows])
            ck, cv = layer.cross_kv(enc[rows])
            kv_filled += (~active & ~padding)[rows].sum(0)
            cross_layers[rows] += 1
            key_blocked = blocked | ~active[:, None, None, :] if drop else blocked
            key_blocked = key_blocked.expand(bsz, 1, length, length)[rows_q, :, pos_q][:, :, None]
            inputs = x[rows_q, pos_q][:, None]
            out = layer(inputs, k[slot], v[slot], self._self_bias(idx, length, abs_bias, False)[:, pos_q].transpose(0, 1)[:, :, None],
                        key_blocked, ck[slot], cv[slot], cross_bias[0][:, pos_q].transpose(0, 1)[:, :, None],
                        cross_blocked[rows_q])
            depths[rows_q, pos_q] += 1
            if idx < len(self.layers) - 1:
                flat = rows_q * length + pos_q
                if forced_depths is not None:
                    stop = forced_depths[rows_q, pos_q] <= idx + 1
                    exited = rule.exit_state(idx, out, self) if rule is not None else out
                else:
                    stop, exited = rule.decide(idx, out, inputs, thresholds[flat], self, state, flat)
                    decided += torch.bincount(pos_q, minlength=length)
                if exited is not out:  # the rule replaces the state of rows that exit here
                    out = torch.where(stop[:, None, None], exited, out)
                active = active.clone()
                active[rows_q[stop], pos_q[stop]] = False
            x = x.index_put((rows_q, pos_q), out[:, 0])
            inner_states.append(x.transpose(0, 1))
        projected = decided if rule is not None and rule.projects else torch.zeros_like(decided)
        self._record_parallel(settings, encoder_out, ~padding, depths, kv_filled, projected,
                              projected if rule is not None and rule.uses_heads else None, cross_layers)
        return x, {"attn": [None], "inner_states": inner_states, "exit_depths": depths}

    def _record_parallel(self, settings, encoder_out, ran, depths, kv_filled=None, projected=None, heads=None,
                         cross_layers=None):
        """Trace a teacher-forced call as one decoder step per position, with the (row, position) pairs
        that ran (``ran`` [B, T]: padding runs in the plain path, not in the exiting one)."""
        if settings is None or settings.trace is None:
            return
        length = depths.size(1)
        n_src = (~encoder_out["encoder_padding_mask"][0]).sum(1)
        if cross_layers is None:
            cross_layers = torch.full_like(n_src, len(self.layers))
        settings.trace.add_cross_kv(n_src, cross_layers)
        kv_filled, projected, heads = ([0] * length if t is None else t.tolist() for t in (kv_filled, projected, heads))
        for t in range(length):
            rows = ran[:, t]
            settings.trace.add_decoder_step(depths[rows, t], t + 1, n_src[rows], kv_filled[t], projected[t], heads[t])

    def _step(self, tokens, encoder_out, incremental_state):
        """One new token per row, with per-row exits and the KV policy for skipped layers."""
        settings = self.exit_settings
        policy_name = settings.kv_policy if settings is not None else "copy"
        cache = self.get_incremental_state(incremental_state, "cache") or {}
        bsz, length = tokens.shape
        step = length - 1
        enc = encoder_out["encoder_out"][0].transpose(0, 1)
        enc_padding = encoder_out["encoder_padding_mask"][0]
        if "ck0" not in cache:
            for idx, layer in enumerate(self.layers):
                cache[f"ck{idx}"], cache[f"cv{idx}"] = layer.cross_kv(enc)
            if settings is not None and settings.trace is not None:
                n_src = (~enc_padding).sum(1)
                settings.trace.add_cross_kv(n_src, torch.full_like(n_src, len(self.layers)))
        positions = self._target_positions(length)
        abs_bias = attention_bias(self.self_pos_q_linear(positions[-1:]), self.self_pos_k_linear(positions),
                                  self.heads, self.pos_scaling)
        cross_bias = self._cross_bias(positions[-1:], encoder_out)
        threshold = settings.dec_threshold(step) if settings is not None else NEVER_EXIT
        rule = settings.dec_rule if settings is not None else None
        deciding = rule is not None and rule.enabled(threshold)
        state = rule.new_state(bsz, tokens.device) if deciding else None
        decided = 0

        x = self._embed(tokens[:, -1:])
        everyone = torch.arange(bsz, device=x.device)
        active = everyone
        depths = torch.zeros(bsz, dtype=torch.long, device=x.device)
        kv_filled = 0
        for idx, layer in enumerate(self.layers):
            full = active.numel() == bsz
            inputs = x if full else x[active]
            k_new, v_new = layer.self_kv(inputs)
            hole_new = None if policy_name == "copy" else torch.zeros(bsz, 1, dtype=torch.bool, device=x.device)
            if not full:
                exited = everyone[~torch.isin(everyone, active)]
                k_all = k_new.new_zeros(bsz, *k_new.shape[1:]).index_copy(0, active, k_new)
                v_all = v_new.new_zeros(bsz, *v_new.shape[1:]).index_copy(0, active, v_new)
                if policy_name == "copy":
                    k_ex, v_ex = layer.self_kv(x[exited])
                    k_all, v_all = k_all.index_copy(0, exited, k_ex), v_all.index_copy(0, exited, v_ex)
                    kv_filled += exited.numel()
                else:
                    hole_new[exited] = True
                k_new, v_new = k_all, v_all
            self._append(cache, f"k{idx}", k_new, 2)
            self._append(cache, f"v{idx}", v_new, 2)
            if policy_name != "copy":
                self._append(cache, f"hole{idx}", hole_new, 1)
                if policy_name == "recompute":
                    kv_filled += self._fill_holes(cache, idx, layer, active)
            if active.numel() == 0:
                # every row has exited: only the caches above needed filling. (Running the layer on an
                # empty batch would waste launches, and SDPA in bf16 on CUDA returned None for it.)
                continue
            keys, values = cache[f"k{idx}"], cache[f"v{idx}"]
            cross_k, cross_v = cache[f"ck{idx}"], cache[f"cv{idx}"]
            blocked = cache[f"hole{idx}"][:, None, None, :] if policy_name == "drop" else None
            cross_blocked = enc_padding
            if not full:
                keys, values, cross_k, cross_v = (t[active] for t in (keys, values, cross_k, cross_v))
                blocked = None if blocked is None else blocked[active]
                cross_blocked = enc_padding[active]
            out = layer(inputs, keys, values, self._self_bias(idx, length, abs_bias, True)[None], blocked,
                        cross_k, cross_v, cross_bias, cross_blocked[:, None, None, :])
            if full:
                depths += 1
            else:
                depths[active] += 1
            stop = None
            if deciding and idx < len(self.layers) - 1:
                stop, out = rule.decide(idx, out, inputs, threshold, self, state, active)
                decided += active.numel()
            x = out if full else x.index_copy(0, active, out)
            if stop is not None:
                active = active[~stop]
        if policy_name == "recompute":
            self._append(cache, "h_exit", x, 1)
        self.set_incremental_state(incremental_state, "cache", cache)
        if settings is not None and settings.trace is not None:
            projected = decided if rule.projects else 0
            settings.trace.add_decoder_step(depths, length, (~enc_padding).sum(1), kv_filled, projected,
                                            projected if rule.uses_heads else 0)
        return x, {"attn": [None], "inner_states": [x.transpose(0, 1)], "exit_depths": depths[:, None]}

    @staticmethod
    def _append(cache, key, value, dim):
        cache[key] = value if key not in cache else torch.cat([cache[key], value], dim)

    @staticmethod
    def _fill_holes(cache, idx, layer, active) -> int:
        """`recompute`: compute the missing keys/values this layer's active rows are about to read."""
        holes = cache[f"hole{idx}"]
        rows_holes = holes[active]
        if not rows_holes.any():
            return 0
        row_idx, pos_idx = rows_holes.nonzero(as_tuple=True)
        rows = active[row_idx]
        k, v = layer.self_kv(cache["h_exit"][rows, pos_idx][:, None])
        cache[f"k{idx}"][rows, :, pos_idx] = k[:, :, 0]
        cache[f"v{idx}"][rows, :, pos_idx] = v[:, :, 0]
        holes[rows, pos_idx] = False
        return int(rows.numel())

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[torch.Tensor]]], new_order):
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache:
            cache = {key: value.index_select(0, new_order) for key, value in cache.items()}
            self.set_incremental_state(incremental_state, "cache", cache)

    def max_positions(self):
        return self.max_target_positions
