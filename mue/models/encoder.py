"""OFA's encoder over [image patches ; text tokens], in two modes.

`joint`: one stack over the concatenation, as OFA runs it. `decomposed` (MuE): the same, tied
layers run an image stream and a text stream apart (each with its own relative-position bias) and
the outputs are concatenated [I_p ; T_q] for the decoder. Each stream (each row of it) stops at its
own depth, set by a depth limit or by the cosine exit policy; rows that stopped are not computed.
"""
from typing import Dict, List, Optional

import torch
from fairseq.models import FairseqEncoder
from torch import nn

from mue.exiting.config import NEVER_EXIT, never_exits

from .image_reuse import ImageStreamCache, image_groups
from .layers import EncoderLayer
from .positions import OFA_BUCKET_POSITIONS, attention_bias, image_bucket_table, image_position_ids, token_bucket_table
from .resnet import ResNetStem

ENCODER_MODES = ("joint", "decomposed")


def parse_blocks(blocks):
    """--resnet-blocks "3,4,23" (or a sequence) -> (3, 4, 23)."""
    try:
        return tuple(int(b) for b in (blocks.split(",") if isinstance(blocks, str) else blocks))
    except ValueError as err:
        raise ValueError(f"--resnet-blocks must be three comma-separated integers, got {blocks!r}") from err


class MueEncoder(FairseqEncoder):
    def __init__(self, cfg, dictionary, embed_tokens: nn.Embedding):
        super().__init__(dictionary)
        if cfg.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"--encoder-mode must be one of {ENCODER_MODES}, got {cfg.encoder_mode!r}")
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.mode, self.heads, self.padding_idx = cfg.encoder_mode, heads, dictionary.pad()
        self.pos_scaling = (dim / heads * cfg.attn_scale_factor) ** -0.5
        self.image_bucket_size = cfg.image_bucket_size
        self.max_source_positions = cfg.max_source_positions
        self.exit_settings = None  # set only inside MueOFAModel.exiting (mue.exiting.session.exit_session)
        # exact sharing at inference: rows that show one image run its image stream once (image_stream), and
        # reordered outputs share each source's tensors (reorder_encoder_out). False runs and copies
        # everything per row, as fairseq's encoders do: for the benchmark's and tests' comparison only
        self.share_sources = True

        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(dim)
        self.type_embedding = nn.Embedding(2, dim)
        self.embed_images = ResNetStem(parse_blocks(cfg.resnet_blocks))
        self.image_proj = nn.Linear(ResNetStem.out_channels, dim)
        self.patch_layernorm_embedding = nn.LayerNorm(dim)
        self.embed_positions = nn.Embedding(cfg.max_source_positions + 2, dim)
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, dim)
        self.pos_ln = nn.LayerNorm(dim)
        self.image_pos_ln = nn.LayerNorm(dim)
        self.pos_q_linear = nn.Linear(dim, dim)
        self.pos_k_linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.encoder_drop_path_rate, cfg.encoder_layers).tolist()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, cfg.encoder_ffn_embed_dim, heads, cfg.dropout, cfg.attention_dropout,
                         cfg.activation_dropout, rate, cfg.attn_scale_factor)
            for rate in rates
        )
        self.layer_norm = nn.LayerNorm(dim)
        n_token_buckets = 2 * cfg.token_bucket_size - 1
        n_image_buckets = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_token_buckets, heads) for _ in self.layers)
        self.image_rel_pos_table_list = nn.ModuleList(nn.Embedding(n_image_buckets, heads) for _ in self.layers)
        # derived tables: recomputed here, never saved or loaded
        self.register_buffer("token_rp_bucket", token_bucket_table(cfg.token_bucket_size, OFA_BUCKET_POSITIONS), persistent=False)
        self.register_buffer("image_rp_bucket", image_bucket_table(cfg.image_bucket_size), persistent=False)

    # ---- embeddings -------------------------------------------------------------------------
    def embed_text(self, src_tokens):
        """Text tokens -> (x [B,S,C], padding [B,S], normed position features [S,C])."""
        bsz, length = src_tokens.shape
        if length == 0:
            raise ValueError("mue_ofa: src_tokens is empty; every row needs at least one text token (OFA prompts start with <s>)")
        if length > self.max_source_positions:
            raise ValueError(f"mue_ofa: {length} source tokens exceed --max-source-positions {self.max_source_positions}")
        padding = src_tokens.eq(self.padding_idx)
        empty = padding.all(dim=1)
        if empty.any():
            raise ValueError(f"mue_ofa: rows {empty.nonzero().flatten().tolist()} of src_tokens are all padding")
        x = self.embed_tokens(src_tokens) + self.type_embedding.weight[0]
        x = self.dropout(self.layernorm_embedding(x))
        positions = self.pos_ln(self.embed_positions.weight[:length])
        return x, padding, positions

    def embed_image(self, patch_images, patch_masks):
        """Images -> (x [B,P,C], padding [B,P], normed position features [P,C], position ids [P])."""
        if patch_images.dim() != 4 or patch_images.size(1) != 3:
            raise ValueError(f"mue_ofa: patch_images must be [B, 3, H, W], got {tuple(patch_images.shape)}")
        features = self.embed_images(patch_images)
        height, width = features.shape[-2:]
        if max(height, width) > self.image_bucket_size:
            raise ValueError(
                f"mue_ofa: a {height}x{width} patch grid exceeds the image bucket size {self.image_bucket_size}; "
                "use a smaller --patch-image-size (at most 16 x bucket size pixels)"
            )
        x = self.image_proj(features.flatten(2).transpose(1, 2)) + self.type_embedding.weight[1]
        x = self.dropout(self.patch_layernorm_embedding(x))
        ids = image_position_ids(height, width, self.image_bucket_size).to(x.device)
        positions = self.image_pos_ln(self.embed_image_positions(ids))
        if patch_masks is None:
            patch_masks = torch.ones(x.size(0), dtype=torch.bool, device=x.device)
        padding = (~patch_masks.bool())[:, None].expand(-1, x.size(1))
        return x, padding, positions, ids

    # ---- attention biases (identical for every row of a batch) --------------------------------
    def _abs_bias(self, positions):
        return attention_bias(self.pos_q_linear(positions), self.pos_k_linear(positions), self.heads, self.pos_scaling)

    def _text_rel_bias(self, idx, length):
        buckets = self.token_rp_bucket[:length, :length]
        return self.token_rel_pos_table_list[idx](buckets).permute(2, 0, 1)

    def _image_rel_bias(self, idx, ids):
        buckets = self.image_rp_bucket[ids][:, ids]
        return self.image_rel_pos_table_list[idx](buckets).permute(2, 0, 1)

    # ---- the stack ---------------------------------------------------------------------------
    def run_stream(self, x, padding, bias_for_layer, threshold=NEVER_EXIT, max_depth=None, rows=None, states=None):
        """Run the tied layers over one stream and return (x, depths[B]).

        Each row stops after `max_depth` layers (int or LongTensor[B]) or once its cosine similarity
        with the previous layer exceeds `threshold`; stopped rows are dropped from later layers'
        batches. `rows`: the rows that take part (others keep their input, depth 0).
        """
        bsz = x.size(0)
        depths = torch.zeros(bsz, dtype=torch.long, device=x.device)
        limit = torch.full_like(depths, len(self.layers))
        if max_depth is not None:
            limit = torch.minimum(limit, torch.as_tensor(max_depth, device=x.device).expand(bsz))
        active = torch.arange(bsz, device=x.device) if rows is None else rows
        everyone = rows is None and max_depth is None and never_exits(threshold)
        blocked = padding[:, None, None, :] if padding.any() else None
        x = x.masked_fill(padding[..., None], 0.0)
        policy = self.exit_settings.policy if self.exit_settings is not None else None
        for idx, layer in enumerate(self.layers):
            bias = bias_for_layer(idx)
            if everyone:  # fast path: no row stops early
                x = layer(x, bias, blocked)
                depths += 1
                if states is not None:
                    states.append(x)
                continue
            active = active[limit[active] > idx]
            if active.numel() == 0:
                break
            inputs = x[active]
            outputs = layer(inputs, bias, None if blocked is None else blocked[active])
            depths[active] += 1
            x = x.index_copy(0, active, outputs)
            if states is not None:
                states.append(x)
            if not never_exits(threshold) and policy is not None:
                similarity = policy.similarity(outputs, inputs, padding[active])
                active = active[~policy.should_exit(similarity, threshold)]
        return x, depths

    def _run_image_stream(self, image_x, image_pad, image_pos, image_ids, max_depth):
        """The tied layers over the image stream of the rows that have an image: (x, depths)."""
        settings = self.exit_settings
        no_depth = torch.zeros(image_x.size(0), dtype=torch.long, device=image_x.device)
        if not image_x.size(1):
            return image_x, no_depth
        with_image = ~image_pad.all(dim=1)
        if not with_image.any():
            return image_x, no_depth
        image_abs = self._abs_bias(image_pos)
        return self.run_stream(
            image_x, image_pad, lambda idx: (image_abs + self._image_rel_bias(idx, image_ids))[None],
            threshold=NEVER_EXIT if settings is None else settings.img_thres, max_depth=max_depth,
            rows=None if with_image.all() else with_image.nonzero().flatten(),
        )

    def image_stream(self, patch_images, patch_masks, max_depth=None, image_keys=None):
        """The decomposed image stream at inference, each image computed once: rows that share an image
        (mue.models.image_reuse.image_groups) share one run of the stem and the image layers, and with an
        ImageStreamCache in the exit session (``image_cache``) images seen in earlier calls are not run
        again. Returns (x [B,P,C], padding [B,P], positions [P,C], position ids, depths [B], encoded [B]:
        the rows whose image was computed here)."""
        bsz, device = patch_images.size(0), patch_images.device
        masks = torch.ones(bsz, dtype=torch.bool, device=device) if patch_masks is None else patch_masks.bool()
        groups = image_groups(patch_images, masks, image_keys) if self.share_sources else None
        reps = torch.arange(bsz, device=device) if groups is None else groups[0]  # one row per image
        settings = self.exit_settings
        cache = getattr(settings, "image_cache", None)
        cached, keys = {}, None
        if cache is not None and image_keys is not None and max_depth is None:
            keys = [ImageStreamCache.key(image_keys[r], tuple(patch_images.shape[-2:]), (settings.img_thres,), self)
                    for r in reps.tolist()]
            cached = {i: entry for i, entry in enumerate(map(cache.get, keys)) if entry is not None}
        todo = [i for i in range(reps.numel()) if i not in cached]
        x = pad = pos = ids = depth = None
        if todo:
            rows = reps[todo] if cached else reps
            limit = max_depth[rows] if isinstance(max_depth, torch.Tensor) and max_depth.dim() else max_depth
            x, pad, pos, ids = self.embed_image(patch_images[rows], masks[rows])
            x, depth = self._run_image_stream(x, pad, pos, ids, limit)
        if cached:
            x, pad, pos, ids, depth = self._merge_cached(cached, todo, reps.numel(), x, pad, pos, ids, depth)
        if keys is not None:
            for i in todo:
                cache.put(keys[i], (x[i:i + 1].detach(), pad[i:i + 1], pos, ids, depth[i:i + 1]))
        computed = torch.zeros(bsz, dtype=torch.bool, device=device)
        computed[reps[todo] if cached else reps] = True
        if groups is not None:
            x, pad, depth = x[groups[1]], pad[groups[1]], depth[groups[1]]
        return x, pad, pos, ids, depth, computed & masks

    @staticmethod
    def _merge_cached(cached, todo, n, x, pad, pos, ids, depth):
        """The representatives' image streams in order: computed ones (`todo`) and cached ones."""
        parts = []
        for i in range(n):
            if i in cached:
                parts.append(cached[i])
            else:
                j = todo.index(i)
                parts.append((x[j:j + 1], pad[j:j + 1], pos, ids, depth[j:j + 1]))
        _, _, pos, ids, _ = parts[0]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), pos, ids,
                torch.cat([p[4] for p in parts]))

    def forward(self, src_tokens, src_lengths=None, patch_images=None, patch_masks=None,
                return_all_hiddens: bool = False, max_image_depth=None, max_text_depth=None, image_keys=None,
                **unused):
        """``image_keys``: each row's image id (the collater passes them): at inference, rows with one
        image share one run of the decomposed image stream (mue.models.image_reuse)."""
        settings = self.exit_settings
        if settings is not None and settings.exit_depth:  # --exit-depth caps both streams
            max_image_depth = settings.exit_depth if max_image_depth is None else max_image_depth
            max_text_depth = settings.exit_depth if max_text_depth is None else max_text_depth
        text_x, text_pad, text_pos = self.embed_text(src_tokens)
        states: Optional[List[torch.Tensor]] = [] if return_all_hiddens else None
        bsz, n_text = text_pad.shape
        encoded = None  # rows whose image stream ran in this call (None: every row with an image)
        image_depth = None
        if patch_images is None:
            image_x = text_x.new_zeros(bsz, 0, text_x.size(-1))
            image_pad = text_pad.new_zeros(bsz, 0)
            image_pos, image_ids = text_pos.new_zeros(0, text_pos.size(-1)), None
        else:
            if patch_images.size(0) != bsz or (patch_masks is not None and patch_masks.numel() != bsz):
                raise ValueError(f"mue_ofa: {bsz} rows of src_tokens but patch_images has {patch_images.size(0)} "
                                 f"and patch_masks {None if patch_masks is None else patch_masks.numel()}")
            if self.mode == "decomposed" and not self.training:  # (training: dropout makes rows differ)
                image_x, image_pad, image_pos, image_ids, image_depth, encoded = self.image_stream(
                    patch_images, patch_masks, max_image_depth, image_keys)
            else:
                image_x, image_pad, image_pos, image_ids = self.embed_image(patch_images, patch_masks)
        n_image = image_x.size(1)
        with_image = ~image_pad.all(dim=1) if n_image else torch.zeros(bsz, dtype=torch.bool, device=text_x.device)

        if self.mode == "joint":
            if max_image_depth is not None and max_text_depth is not None and not torch.equal(
                torch.as_tensor(max_image_depth), torch.as_tensor(max_text_depth)
            ):
                raise ValueError("mue_ofa: the joint encoder runs one stream; image and text depth limits must agree")
            abs_bias = self._abs_bias(torch.cat([image_pos, text_pos]))

            def joint_bias(idx):
                bias = abs_bias.clone()
                bias[:, n_image:, n_image:] += self._text_rel_bias(idx, n_text)
                if n_image:
                    bias[:, :n_image, :n_image] += self._image_rel_bias(idx, image_ids)
                return bias[None]

            x, depth = self.run_stream(
                torch.cat([image_x, text_x], 1), torch.cat([image_pad, text_pad], 1), joint_bias,
                threshold=NEVER_EXIT if settings is None else settings.joint_thres,
                max_depth=max_text_depth if max_image_depth is None else max_image_depth, states=states,
            )
            image_depth, text_depth = depth * with_image, depth
        else:
            if image_depth is None:  # training: every row runs its own image
                image_x, image_depth = self._run_image_stream(image_x, image_pad, image_pos, image_ids,
                                                              max_image_depth)
            text_abs = self._abs_bias(text_pos)
            text_x, text_depth = self.run_stream(
                text_x, text_pad, lambda idx: (text_abs + self._text_rel_bias(idx, n_text))[None],
                threshold=NEVER_EXIT if settings is None else settings.txt_thres, max_depth=max_text_depth,
            )
            x = torch.cat([image_x, text_x], 1)
            if states is not None:
                states.append(x)  # streams exit apart: only the final concatenation is a shared "layer"

        x = self.layer_norm(x)
        padding = torch.cat([image_pad, text_pad], 1)
        if settings is not None and settings.trace is not None:
            settings.trace.add_encoder(image_depth, text_depth, (~image_pad).sum(1), (~text_pad).sum(1), self.mode == "joint",
                                       () if patch_images is None else tuple(patch_images.shape[-2:]), encoded)
        positions = torch.cat([image_pos, text_pos])[None].expand(bsz, -1, -1)
        return {
            "encoder_out": [x.transpose(0, 1)],  # T x B x C
            "encoder_padding_mask": [padding],  # B x T
            "encoder_states": [s.transpose(0, 1) for s in states] if states is not None else [],
            "position_embeddings": [positions],  # B x T x C
            "exit_depths": [torch.stack([image_depth, text_depth], 1)],  # B x 2: image, text
            "source_rows": [],  # after reorder_encoder_out: row -> source (the tensors above stay per source)
            "src_tokens": [],
            "src_lengths": [],
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List[torch.Tensor]], new_order):
        """Rows in a new order (beam search repeats each source per beam and reorders beams every step;
        answer scoring repeats it per candidate). The per-source tensors are not copied: the output keeps
        them and a `source_rows` index, row -> source, which the decoder reads (one set of cross-attention
        keys/values per source). Per-row entries (exit depths) are reordered."""
        if not self.share_sources:
            return self._copy_rows(encoder_out, new_order)
        rows = (encoder_out.get("source_rows") or [None])[0]
        rows = new_order if rows is None else rows.index_select(0, new_order)
        reordered = dict(encoder_out)
        reordered["source_rows"] = [rows]
        reordered["exit_depths"] = [t.index_select(0, new_order) for t in encoder_out.get("exit_depths", [])]
        return reordered

    @staticmethod
    def _copy_rows(encoder_out, new_order):
        """The per-row copy fairseq encoders make (each beam row gets its own copy of its source's states,
        and so its own cross keys/values): `share_sources = False`, the reference the benchmark and the
        tests compare the shared layout with."""
        def pick(key, dim):
            return [t.index_select(dim, new_order) for t in encoder_out.get(key, [])]

        return {"encoder_out": pick("encoder_out", 1), "encoder_padding_mask": pick("encoder_padding_mask", 0),
                "encoder_states": pick("encoder_states", 1), "position_embeddings": pick("position_embeddings", 0),
                "exit_depths": pick("exit_depths", 0), "source_rows": [], "src_tokens": [], "src_lengths": []}

    def max_positions(self):
        return self.max_source_positions
