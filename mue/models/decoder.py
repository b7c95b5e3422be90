"""OFA's decoder with per-row early exit.

Teacher-forced (parallel) calls run all positions at once. Without exits every position runs every
layer (training); with exits a position that exits keeps its hidden state, so later layers see
keys/values computed from it (the `copy` semantics), and later layers run only the positions still
active (their queries are gathered), so the trace records what ran.

Cached (incremental) calls decode one token per row (see `_step` for the two layouts that skip the
layers of exited rows); the keys/values later tokens need for a skipped layer follow the KV policy:
`copy` computes them from the exited state now, `recompute` computes the same values later and only if
a later token reaches that layer, `drop` leaves a masked hole (the reference's choice, kept for
comparison; positions stay aligned).

Cross-attention keys/values are computed once per source, not per beam row or answer candidate: the
encoder's reordered outputs keep their per-source tensors with a row -> source index, each source's
rows (grouped, as fairseq's beams are) attend to its keys/values in place, and beam reordering moves
only the index. Generation computes a layer's cross keys/values the first time a step reaches it.
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

    # ---- per-source cross-attention ----------------------------------------------------------------
    @staticmethod
    def _sources(encoder_out):
        """(encoder states [N_src, S, C], padding [N_src, S], row -> source [R] or None: row r is source r).
        Reordered encoder outputs (fairseq's beams, answer scoring) keep their per-source tensors and a
        `source_rows` index (mue.models.encoder), so each source's cross keys/values are computed once."""
        rows = encoder_out.get("source_rows") or [None]
        return encoder_out["encoder_out"][0].transpose(0, 1), encoder_out["encoder_padding_mask"][0], rows[0]

    @staticmethod
    def _group_size(rows: Optional[torch.Tensor], n_sources: int) -> Optional[int]:
        """G when row r belongs to source r // G for every row (beams of one sentence, candidates of one
        question): then one batched attention serves each source's G rows and its keys/values are read
        in place. None otherwise (rows gather their source's keys/values). One host sync."""
        if rows is None:
            return 1
        if rows.numel() == 0 or rows.numel() % n_sources:
            return None
        group = rows.numel() // n_sources
        expected = torch.arange(n_sources, device=rows.device).repeat_interleave(group)
        return group if torch.equal(rows, expected) else None

    @staticmethod
    def _attend_sources(layer, x, ck, cv, bias, padding, rows, group):
        """The cross-attention block for rows `x` [R, T, C] over per-source keys/values [N_src, H, S, Dh];
        `rows`: each row's source (None: row r is source r); `group`: see _group_size."""
        if rows is None or group == 1:
            return layer.cross_attention(x, ck, cv, bias, padding[:, None, None, :])
        if group is not None:
            n_src, (n_rows, length, dim) = ck.size(0), x.shape
            out = layer.cross_attention(x.reshape(n_src, group * length, dim), ck, cv, bias.repeat(1, 1, group, 1),
                                        padding[:, None, None, :])
            return out.view(n_rows, length, dim)
        return layer.cross_attention(x, ck[rows], cv[rows], bias, padding[rows][:, None, None, :])

    # ---- teacher forcing --------------------------------------------------------------------------
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
        enc, enc_padding, rows_src = self._sources(encoder_out)
        padding = tokens.eq(self.padding_idx)
        blocked = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
        blocked = blocked | padding[:, None, None, :]  # (no `if padding.any()`: that would be a host sync)

        x = self._embed(tokens)
        inner_states: List[torch.Tensor] = [x.transpose(0, 1)]
        rule = settings.dec_rule if settings is not None else None
        thresholds = None
        if settings is not None and forced_depths is None:
            thresholds = torch.tensor([settings.dec_threshold(t) for t in range(length)], device=x.device)
            thresholds = thresholds if rule.enabled(thresholds) else None
        if forced_depths is None and thresholds is None:  # every position runs every layer
            group = self._group_size(rows_src, enc.size(0))
            for idx, layer in enumerate(self.layers):
                k, v = layer.self_kv(x)
                ck, cv = layer.cross_kv(enc)
                h = layer.self_attention(x, k, v, self._self_bias(idx, length, abs_bias, False)[None], blocked)
                h = self._attend_sources(layer, h, ck, cv, cross_bias, enc_padding, rows_src, group)
                x = layer.feed_forward(h)
                inner_states.append(x.transpose(0, 1))
            depths = torch.full((bsz, length), len(self.layers), dtype=torch.long, device=x.device)
            self._record_parallel(settings, enc_padding, rows_src, None, depths)  # padding ran too
            return x, {"attn": [None], "inner_states": inner_states, "exit_depths": depths}

        rows_src = torch.arange(bsz, device=x.device) if rows_src is None else rows_src
        thresholds = None if thresholds is None else thresholds.expand(bsz, length).flatten()
        drop = settings is not None and settings.kv_policy == "drop"
        state = rule.new_state(bsz * length, x.device) if thresholds is not None else None
        active = ~padding  # padding positions are never read: they need no layer
        depths = torch.zeros(bsz, length, dtype=torch.long, device=x.device)
        decided = torch.zeros(length, dtype=torch.long, device=x.device)  # exit decisions per position
        kv_filled = torch.zeros(length, dtype=torch.long, device=x.device)  # k/v of exited positions computed
        cross_layers = torch.zeros(enc.size(0), dtype=torch.long, device=x.device)  # cross k/v made per source
        for idx, layer in enumerate(self.layers):
            rows_q, pos_q = active.nonzero(as_tuple=True)  # the queries this layer runs, row-major
            if rows_q.numel() == 0:
                inner_states.append(x.transpose(0, 1))
                continue
            rows = active.any(1).nonzero().flatten()  # rows with a query: their keys/values are needed
            row_slot = torch.zeros(bsz, dtype=torch.long, device=x.device).index_copy_(
                0, rows, torch.arange(rows.numel(), device=x.device))
            sources = torch.zeros(enc.size(0), dtype=torch.bool, device=x.device).index_fill_(0, rows_src[rows], True)
            sources = sources.nonzero().flatten()  # sources with a query: their cross keys/values are needed
            source_slot = torch.zeros(enc.size(0), dtype=torch.long, device=x.device).index_copy_(
                0, sources, torch.arange(sources.numel(), device=x.device))
            k, v = layer.self_kv(x[rows])
            ck, cv = layer.cross_kv(enc[sources])
            kv_filled += (~active & ~padding)[rows].sum(0)
            cross_layers[sources] += 1
            key_blocked = blocked | ~active[:, None, None, :] if drop else blocked
            key_blocked = key_blocked.expand(bsz, 1, length, length)[rows_q, :, pos_q][:, :, None]
            inputs = x[rows_q, pos_q][:, None]
            q_slot, q_source = row_slot[rows_q], source_slot[rows_src[rows_q]]
            h = layer.self_attention(inputs, k[q_slot], v[q_slot],
                                     self._self_bias(idx, length, abs_bias, False)[:, pos_q].transpose(0, 1)[:, :, None],
                                     key_blocked)
            h = layer.cross_attention(h, ck[q_source], cv[q_source], cross_bias[0][:, pos_q].transpose(0, 1)[:, :, None],
                                      enc_padding[rows_src[rows_q]][:, None, None, :])
            out = layer.feed_forward(h)
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
        self._record_parallel(settings, enc_padding, rows_src, ~padding, depths, kv_filled, projected,
                              projected if rule is not None and rule.uses_heads else None, cross_layers)
        return x, {"attn": [None], "inner_states": inner_states, "exit_depths": depths}

    def _record_parallel(self, settings, enc_padding, rows_src, ran, depths, kv_filled=None, projected=None,
                         heads=None, cross_layers=None):
        """Trace a teacher-forced call: the cross keys/values made per source, then one decoder step per
        position with the (row, position) pairs that ran (``ran`` [B, T]; None: all, padding included, as in
        the plain path)."""
        if settings is None or settings.trace is None:
            return
        length = depths.size(1)
        n_src = (~enc_padding).sum(1)
        if cross_layers is None:
            cross_layers = torch.full_like(n_src, len(self.layers))
        settings.trace.add_cross_kv(n_src, cross_layers)
        n_src_rows = n_src if rows_src is None else n_src[rows_src]
        kv_filled, projected, heads = ([0] * length if t is None else t.tolist() for t in (kv_filled, projected, heads))
        for t in range(length):
            rows = slice(None) if ran is None else ran[:, t]
            settings.trace.add_decoder_step(depths[rows, t], t + 1, n_src_rows[rows], kv_filled[t], projected[t],
                                            heads[t])

    # ---- one generation step ------------------------------------------------------------------------
    def _step(self, tokens, encoder_out, incremental_state):
        """One new token per row, with per-row exits and the KV policy for skipped layers.

        How exited rows skip work (--dec-compaction; results are the same either way, up to float rounding):
          * rows (the default): each layer runs only the rows still active; rows that exited get the
            keys/values of the KV policy; a layer no row reaches is skipped. It reads the active rows'
            count on the host at every layer: free on a CPU; on a GPU the skipped layers' launches were
            worth more than the syncs in the measurements so far (README).
          * dense (always when no row can exit at this step): every layer runs every row and exited rows
            keep their state (so their keys/values are those of `copy`; `recompute` gives the same values;
            `drop` masks them): one host sync per step, none per layer or row, but no layer is skipped.
        Cross-attention keys/values are computed per source (not per beam row), the first time a step
        reaches the layer, and read in place by each source's rows."""
        settings = self.exit_settings
        policy_name = settings.kv_policy if settings is not None else "copy"
        cache = self.get_incremental_state(incremental_state, "cache") or {}
        cross = self.get_incremental_state(incremental_state, "cross") or self._new_cross(encoder_out)
        bsz, length = tokens.shape
        step = length - 1
        positions = self._target_positions(length)
        abs_bias = attention_bias(self.self_pos_q_linear(positions[-1:]), self.self_pos_k_linear(positions),
                                  self.heads, self.pos_scaling)
        cross_bias = self._cross_bias(positions[-1:], encoder_out)
        threshold = settings.dec_threshold(step) if settings is not None else NEVER_EXIT
        rule = settings.dec_rule if settings is not None else None
        deciding = rule is not None and rule.enabled(threshold)
        if cross["group"] == "unknown":
            cross["group"] = self._group_size(cross["rows"], cross["enc"].size(0))
        run = self._compact_layers if deciding and settings.compact_rows else self._dense_layers
        x, depths, ran, kv_filled, decided = run(self._embed(tokens[:, -1:]), cache, cross, abs_bias, cross_bias,
                                                 length, policy_name, rule if deciding else None, threshold)
        if policy_name == "recompute":
            self._append(cache, "h_exit", x, 1)
        self.set_incremental_state(incremental_state, "cache", cache)
        self.set_incremental_state(incremental_state, "cross", cross)
        if settings is not None and settings.trace is not None:
            projected = decided if deciding and rule.projects else 0
            n_src = (~cross["padding"]).sum(1)[cross["rows"]]
            settings.trace.add_decoder_step(depths, length, n_src, kv_filled, projected,
                                            projected if deciding and rule.uses_heads else 0, ran=ran)
        return x, {"attn": [None], "inner_states": [x.transpose(0, 1)], "exit_depths": depths[:, None]}

    def _new_cross(self, encoder_out):
        """Per-source state of a generation: the encoder states and padding, each row's source, and the
        cross keys/values computed so far (ck{i}/cv{i})."""
        enc, padding, rows = self._sources(encoder_out)
        if rows is None:
            rows = torch.arange(enc.size(0), device=enc.device)
        settings = self.exit_settings
        if settings is not None and settings.trace is not None:  # the sources the full model pays for
            n_src = (~padding).sum(1)
            settings.trace.add_cross_kv(n_src, torch.zeros_like(n_src))
        return {"enc": enc, "padding": padding, "rows": rows, "group": "unknown"}

    def _cross_kv(self, cross, idx, layer):
        """Layer idx's cross keys/values for every source, computed the first time a step reaches the layer."""
        if f"ck{idx}" not in cross:
            cross[f"ck{idx}"], cross[f"cv{idx}"] = layer.cross_kv(cross["enc"])
            settings = self.exit_settings
            if settings is not None and settings.trace is not None:
                n_src = (~cross["padding"]).sum(1)
                settings.trace.add_cross_kv(n_src, torch.ones_like(n_src), full=False)
        return cross[f"ck{idx}"], cross[f"cv{idx}"]

    def _dense_layers(self, x, cache, cross, abs_bias, cross_bias, length, policy_name, rule, threshold):
        """Every row through every layer; exits freeze a row's state (see _step)."""
        bsz = x.size(0)
        active = torch.ones(bsz, dtype=torch.bool, device=x.device)
        depths = torch.zeros(bsz, dtype=torch.long, device=x.device)
        state = rule.new_state(bsz, x.device) if rule is not None else None
        decided = 0
        for idx, layer in enumerate(self.layers):
            k_new, v_new = layer.self_kv(x)
            self._append(cache, f"k{idx}", k_new, 2)
            self._append(cache, f"v{idx}", v_new, 2)
            blocked = None
            if policy_name != "copy":  # drop: a hole where the row exited before this layer; recompute: none
                self._append(cache, f"hole{idx}", ~active[:, None] if policy_name == "drop" else
                             torch.zeros_like(active)[:, None], 1)
                blocked = cache[f"hole{idx}"][:, None, None, :] if policy_name == "drop" else None
            ck, cv = self._cross_kv(cross, idx, layer)
            h = layer.self_attention(x, cache[f"k{idx}"], cache[f"v{idx}"],
                                     self._self_bias(idx, length, abs_bias, True)[None], blocked)
            h = self._attend_sources(layer, h, ck, cv, cross_bias, cross["padding"], cross["rows"], cross["group"])
            out = layer.feed_forward(h)
            depths += active
            if rule is not None and idx < len(self.layers) - 1:
                stop, out = rule.decide(idx, out, x, threshold, self, state, None)
                decided += bsz
                x = torch.where(active[:, None, None], out, x)
                active = active & ~stop
            else:
                x = torch.where(active[:, None, None], out, x) if rule is not None else out
        ran = torch.full_like(depths, len(self.layers))
        return x, depths, ran, 0, decided

    def _compact_layers(self, x, cache, cross, abs_bias, cross_bias, length, policy_name, rule, threshold):
        """Each layer runs only the rows still active (see _step)."""
        bsz = x.size(0)
        everyone = torch.arange(bsz, device=x.device)
        active = everyone
        depths = torch.zeros(bsz, dtype=torch.long, device=x.device)
        state = rule.new_state(bsz, x.device)
        kv_filled = decided = 0
        for idx, layer in enumerate(self.layers):
            full = active.numel() == bsz
            inputs = x if full else x[active]
            k_new, v_new = layer.self_kv(inputs)
            hole_new = None if policy_name == "copy" else torch.zeros(bsz, 1, dtype=torch.bool, device=x.device)
            if not full:
                left = torch.ones(bsz, dtype=torch.bool, device=x.device).index_fill_(0, active, False)
                exited = left.nonzero().flatten()
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
            blocked = cache[f"hole{idx}"][:, None, None, :] if policy_name == "drop" else None
            if not full:
                keys, values = keys[active], values[active]
                blocked = None if blocked is None else blocked[active]
            ck, cv = self._cross_kv(cross, idx, layer)
            h = layer.self_attention(inputs, keys, values, self._self_bias(idx, length, abs_bias, True)[None], blocked)
            if full:
                h = self._attend_sources(layer, h, ck, cv, cross_bias, cross["padding"], cross["rows"], cross["group"])
            else:
                h = self._attend_sources(layer, h, ck, cv, cross_bias, cross["padding"], cross["rows"][active], None)
            out = layer.feed_forward(h)
            depths[active] += 1
            stop = None
            if idx < len(self.layers) - 1:
                stop, out = rule.decide(idx, out, inputs, threshold, self, state, active)
                decided += active.numel()
            x = out if full else x.index_copy(0, active, out)
            if stop is not None:
                active = active[~stop]
        return x, depths, depths, kv_filled, decided

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
        """Beam search moved rows: per-row caches follow them; per-source cross keys/values stay, only the
        rows' source index follows (and sources no row uses any more are dropped)."""
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache:
            cache = {key: value.index_select(0, new_order) for key, value in cache.items()}
            self.set_incremental_state(incremental_state, "cache", cache)
        cross = self.get_incremental_state(incremental_state, "cross")
        if cross:
            cross = dict(cross)
            shrunk = new_order.numel() < cross["rows"].numel()
            cross["rows"] = cross["rows"].index_select(0, new_order)
            if shrunk:  # fairseq dropped finished sentences: keep only the sources still in use
                used = torch.unique(cross["rows"])
                cross["rows"] = torch.searchsorted(used, cross["rows"])
                for key in [k for k in cross if k in ("enc", "padding") or k.startswith(("ck", "cv"))]:
                    cross[key] = cross[key].index_select(0, used)
            cross["group"] = "unknown"
            self.set_incremental_state(incremental_state, "cross", cross)

    def max_positions(self):
        return self.max_target_positions
